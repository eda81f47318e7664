"""DeepSeek-V3 and dense (Qwen2 / Llama) decoder-only transformers, in one readable file.

What is implemented, with the paper sections:
- Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1). Keys and values are compressed into a latent
  c_kv (kv_lora_rank wide, RMS-normalised) plus one rotary key k_pe shared by all heads; only those two are
  cached. Two paths compute the same function:
    naive     up-project the latent to per-head keys/values, then SDPA; cheapest for training and prefill;
    absorbed  fold W_UK into the query and W_UV into the output (V2 §2.1.2 appendix), so attention runs
              directly on the cached latent as multi-query attention with one 576-wide (V3) key per token;
              cheapest for decoding, where the naive path would re-expand the whole cache every step.
- DeepSeekMoE (V3 §2.1.2): shared experts + fine-grained routed experts; sigmoid (V3) or softmax (V2) affinity;
  the auxiliary-loss-free balancing bias `e_score_correction_bias` used for expert *selection* only; node/group
  limited routing; normalised top-k weights times `routed_scaling_factor`; the optional sequence-wise balance
  loss (eq. 17-20). Tokens are dispatched grouped by expert, so compute follows active parameters.
- Multi-token prediction (V3 §2.2): D sequential modules; module k joins the embedding of token i+k with the
  representation of depth k-1 (`eh_proj` of the embedding-first concatenation), runs one transformer block,
  and predicts token i+k+1 through the main model's output head.
- RoPE in DeepSeek's interleaved-pair layout or Llama's half layout, with YaRN (and its attention mscale),
  Llama-3 and linear scaling.
- Dense Qwen2 / Llama blocks (GQA, SwiGLU, optional QKV bias, tied embeddings) for distillation students.
- CPU decoding: no-grad steps of a few rows run their projections, routed experts and cached attention in C++
  (r1kit/csrc, built by `kernels` on first use); the PyTorch code here is each kernel's twin and fallback.

Module attribute names equal Hugging Face checkpoint keys (`model.layers.3.self_attn.kv_b_proj.weight`), except
routed experts, which are stacked into 3-D tensors for grouped compute (`checkpoint.py` maps them), and MTP
modules, which live in `mtp` and are stored as layers num_hidden_layers + k, as DeepSeek ships them.
Nothing here needs a process group; parallelism wraps this model from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1kit import kernels
from r1kit.config import ModelConfig, yarn_mscale


# --------------------------------------------------------------------------------------------------- basics
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # fp32 statistics whatever the activation dtype, then the weight in the activation dtype (as HF does)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, with the decode step's fast path on CPU: without autograd, a float32 projection of up to 32 rows runs
    in the C++ kernel `small_linear` (csrc/linear.cpp), which hands more rows to BLAS. Its twin is F.linear.
    `packed`, when `pack_linears` has set it, is the weight again in 16-column panels, which the kernel reads from 8
    rows on."""

    packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def _small_rows_kernel(name: str, x: Tensor, weight: Tensor):
    """The kernel `name` when x @ weight.T can take it: float32 on CPU, no autograd; else None."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return cpu_kernel(name)
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: Tensor | None = None) -> Tensor:
    op = _small_rows_kernel("small_linear", x, weight)
    return op(x, weight, bias, packed) if op is not None else F.linear(x, weight, bias)


def linears(x: Tensor, *projections: Linear) -> list[Tensor]:
    """x through several projections of one input (q / k / v, gate / up). On the decode path one kernel call
    (`small_linear2` / `small_linear3`) splits the blocks of all their weights across the threads together; else
    each module."""
    op = _small_rows_kernel(f"small_linear{len(projections)}", x, projections[0].weight)
    if op is not None:
        return list(op(x, *[t for p in projections for t in (p.weight, p.bias)], *[p.packed for p in projections]))
    return [p(x) for p in projections]


def pack_linears(model: nn.Module, *, refresh: bool = False) -> int:
    """Give every float32 CPU `Linear` of `model` a copy of its weight in 16-column panels (`Linear.packed`), which
    the decode kernel reads from 8 rows on (1.3x the plain layout on a step's projections, docs/BENCHMARKS.md).
    It costs the weights' memory again. With refresh=True, only the linears packed before are packed anew, in place
    (compiled graphs keep reading the same tensors): call it after changing the weights. A pack that no longer
    matches its weight's version counter is ignored by the kernel, but an update that does not move the counter
    (e.g. a fused optimizer step) needs the refresh. Returns the bytes the packs take; 0 without the C++ kernels."""
    op = cpu_kernel("pack_panels")
    if op is None:
        return 0
    total = 0
    with torch.no_grad():
        for m in model.modules():
            w = m.weight if isinstance(m, Linear) else None
            if (w is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.is_inference()
                    or type(w.data) is not torch.Tensor):  # (a sharded DTensor: not packed)
                continue
            if refresh and m.packed is None:
                continue
            p = op(w)
            if refresh and m.packed.shape == p.shape:
                m.packed.copy_(p)
            else:
                m.packed = p
            total += p.nbytes
    return total


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------- RoPE
def rope_parameters(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (rope_dim / 2,) and the factor that scales cos/sin (YaRN's attention factor)."""
    dim, base = config.rope_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.float(), 1.0
    kind, factor = rs["rope_type"], float(rs["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "llama3":
        old = rs["original_max_position_embeddings"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        mid = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float(), 1.0
    # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in between.
    old = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq = inv_freq.float()
    ramp = ramp.float()
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate pairs of x (B, T, H, D) by the angles in cos/sin (B, T, D/2).

    DeepSeek stores rotary dims as interleaved pairs (x0, x1), (x2, x3), ...; Llama as halves (x_i, x_{i+D/2}).
    Both come out in half layout, which leaves dot products unchanged as long as q and k are treated alike.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


# ------------------------------------------------------------------------------------------------ the cache
class KVCache:
    """Preallocated per-layer cache, one row ("slot") per sequence.

    MLA layers keep one tensor (slots, max_len, kv_lora_rank + qk_rope_head_dim): the normalised latent c_kv and
    the rotated shared key k_pe side by side, which is at once the absorbed path's key (all of it) and value (the
    first kv_lora_rank columns). Dense layers keep K and V as (slots, n_kv_heads, max_len, head_dim). `dtype` may be
    narrower than the model's (a 16-bit cache): rows are rounded when stored and read back in the model's dtype.
    """

    def __init__(self, config: ModelConfig, max_slots: int, max_len: int, *, device=None, dtype=torch.float32,
                 with_mtp: bool = True):
        self.config, self.max_slots, self.max_len = config, max_slots, max_len
        n_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if with_mtp else 0)
        if config.is_mla:
            width = config.kv_lora_rank + config.qk_rope_head_dim
            self.layers = [torch.zeros(max_slots, max_len, width, device=device, dtype=dtype) for _ in range(n_layers)]
        else:
            shape = (max_slots, config.num_key_value_heads, max_len, config.head_dim)
            self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                           for _ in range(n_layers)]
        self.dtype = dtype

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across the main model's layers."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return self.config.kv_cache_elements_per_token() * self.config.num_hidden_layers * size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in (layer if isinstance(layer, tuple) else (layer,)))


@dataclass
class Context:
    """What every attention layer needs for one forward pass, computed once per pass."""

    cos: Tensor  # (B, T, rope_dim/2)
    sin: Tensor
    positions: Tensor  # (B, T) absolute position of each input token
    cache: KVCache | None = None
    slots: Tensor | None = None  # (B,) cache row of each input row; None = rows 0..B-1
    kv_len: int = 0  # keys to attend over (cache only)
    mask: Tensor | None = None  # (B, 1, T, kv_len) bool, True = may attend; None = plain causal
    bias: Tensor | None = None  # the same as 0 / -inf, (B, T, 1, kv_len), for the absorbed path

    def store(self, buf: Tensor, new: Tensor) -> None:
        """Store `new` (B, T, ...) at each row's positions in `buf`."""
        buf[self.rows(new.shape[0])[:, None], self.positions] = new.to(buf.dtype)

    def rows(self, B: int) -> Tensor:
        return self.slots if self.slots is not None else torch.arange(B, device=self.positions.device)

    def write(self, layer: int, buf: Tensor, new: Tensor) -> Tensor:
        """Store `new` (B, T, ...) at each row's positions in `buf` and return the rows (B, kv_len, ...) in new's
        dtype."""
        self.store(buf, new)
        if self.slots is None:
            return buf[: new.shape[0], : self.kv_len].to(new.dtype)
        return buf[self.slots, : self.kv_len].to(new.dtype)

    def store_heads(self, buf: Tensor, new: Tensor) -> None:
        """As `store`, for a (slots, heads, len, dim) buffer and new (B, T, heads, dim)."""
        buf[self.rows(new.shape[0])[:, None], :, self.positions] = new.to(buf.dtype)

    def write_heads(self, buf: Tensor, new: Tensor) -> Tensor:
        """As `write`, for a (slots, heads, len, dim) buffer and new (B, T, heads, dim)."""
        self.store_heads(buf, new)
        if self.slots is None:
            return buf[: new.shape[0], :, : self.kv_len].to(new.dtype)
        return buf[self.slots, :, : self.kv_len].to(new.dtype)


# --------------------------------------------------------------------------------------------------- MLA
LATENT_IN_PLACE = 1024  # keys from which `latent_attention` (no C++ kernel) beats gathering the cache rows


class MLA(nn.Module):
    """Multi-head latent attention with a naive (training / prefill) and an absorbed (decode) path."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        qk = self.nope_dim + self.rope_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = qk**-0.5
        rs = c.rope_scaling
        if rs is not None and rs["rope_type"] == "yarn" and rs.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        self.impl = "auto"  # "naive" | "absorbed" | "auto" (cheaper of the two by a FLOP count)

    def use_absorbed(self, T: int, S: int) -> bool:
        if self.impl != "auto":
            return self.impl == "absorbed"
        r, dn, dr, dv = self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim
        naive = S * r * (dn + dv) + T * S * (dn + dr + dv)  # re-expand S latents, then attend per head
        absorbed = T * r * (dn + dv) + T * S * (2 * r + dr)  # fold weights into T queries, attend in latent space
        return absorbed < naive

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        H, r = self.n_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q, kv = linears(x, self.q_proj, self.kv_a_proj_with_mqa)
        else:
            q, kv = linears(x, self.q_a_proj, self.kv_a_proj_with_mqa)
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, T, H, self.nope_dim + self.rope_dim)  # (B, T, H, dn + dr)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, interleaved=True)
        c_kv, k_pe = kv.split([r, self.rope_dim], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), ctx.cos, ctx.sin, interleaved=True).squeeze(2)
        latent = torch.cat([c_kv, k_pe], dim=-1)  # (B, T, r + dr)
        attend = None
        if ctx.cache is not None and x.device.type == "cpu" and self.use_absorbed(T, ctx.kv_len):
            # On CPU, decode attends in the cache itself: gathering the rows first copies the whole context every
            # layer and step. The C++ kernel wins at every length (8 heads: 5 vs 57 us at 32 keys, 92 vs 325 at 4k);
            # its PyTorch twin, two matmuls a row, only from ~1k keys.
            buf = ctx.cache.layers[self.layer_idx]
            attend = decode_kernel("latent_attention", buf, latent.dtype)
            if attend is None and ctx.kv_len >= LATENT_IN_PLACE:
                attend = latent_attention
        if attend is not None:
            ctx.store(buf, latent)
            out = self._absorbed(q_nope, q_pe, lambda qq: attend(
                qq * self.softmax_scale, buf, ctx.rows(B), ctx.positions, self.n_heads, r))
        else:
            if ctx.cache is not None:
                latent = ctx.write(self.layer_idx, ctx.cache.layers[self.layer_idx], latent)  # (B, S, r + dr)
            if self.use_absorbed(T, latent.shape[1]):
                out = self._absorbed(q_nope, q_pe, lambda qq: _latent_scores(qq, latent, ctx.bias, H, r,
                                                                              self.softmax_scale))
            else:
                out = self._naive(q_nope, q_pe, latent, ctx.mask)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def _naive(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, mask: Tensor | None) -> Tensor:
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)  # (B, S, H, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope_dim)], dim=-1)  # (B, S, H, dn + dr)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, dn + dr)
        qk_dim = self.nope_dim + self.rope_dim
        if self.v_dim < qk_dim:  # fused (flash) SDPA kernels want one head size: pad V, slice the output
            v = F.pad(v, (0, qk_dim - self.v_dim))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T|S, d)
            attn_mask=mask, is_causal=mask is None and T > 1, scale=self.softmax_scale,
        )
        return o.transpose(1, 2)[..., : self.v_dim]  # (B, T, H, dv)

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, attend) -> Tensor:
        """Fold W_uk into the queries, attend in latent space (`attend`: (B, T*H, r + dr) -> (B, T*H, r)), then
        unfold the latent output through W_uv."""
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, dn, r), (H, dv, r)
        # A compiled step of a few rows (decode, verify) folds as products and sums, which inductor fuses into one
        # pass over the weights; as bmm, two positions or more became two library calls a layer (measured 2 x 13 us
        # against 2 fused kernels of ~4 us at 2 positions, 16 layers).
        fused = torch.compiler.is_compiling() and B * T <= 8
        if fused:
            q_lat = (q_nope.reshape(B * T, H, self.nope_dim, 1) * w_uk).sum(-2)  # (B*T, H, r)
        else:
            q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope_dim).transpose(0, 1), w_uk).transpose(0, 1)
        # Every head attends to the same latent keys, so heads fold into the query rows: one matmul, no repeat.
        qq = torch.cat([q_lat.reshape(B, T, H, r), q_pe], dim=-1).view(B, T * H, r + self.rope_dim)
        o_lat = attend(qq).view(B * T, H, r)
        if fused:
            return (o_lat.unsqueeze(2) * w_uv).sum(-1).view(B, T, H, self.v_dim)
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, dv)
        return o.transpose(0, 1).view(B, T, H, self.v_dim)


def _latent_scores(qq: Tensor, latent: Tensor, bias: Tensor | None, heads: int, rank: int, scale: float) -> Tensor:
    """Absorbed attention over latent rows (B, S, r + dr): query rows (B, T*H, r + dr), t-major, see the keys that
    `bias` (B, T, 1, S; 0 / -inf) allows, or causally the last T keys when it is None. -> (B, T*H, r)."""
    B, TH, _ = qq.shape
    S, T = latent.shape[1], TH // heads
    if bias is not None:
        scores = torch.baddbmm(bias.expand(B, T, heads, S).reshape(B, TH, S), qq, latent.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(qq, latent.transpose(1, 2)).mul_(scale) + torch.full(
            (T, S), float("-inf"), device=latent.device).triu_(S - T + 1).repeat_interleave(heads, 0)
    probs = scores.float().softmax(dim=-1).to(latent.dtype)  # (B, T*H, S)
    return torch.bmm(probs, latent[..., :rank])


@torch.library.custom_op("r1kit::latent_attention", mutates_args=())
def latent_attention(qq: Tensor, cache: Tensor, slots: Tensor, positions: Tensor, heads: int, rank: int) -> Tensor:
    """Absorbed attention of query rows qq (B, T*H, r + dr), t-major and already scaled, over each row's own cache
    slot (slots, max_len, r + dr), read in place: query t of row b sees the keys at positions up to positions[b, t].
    -> (B, T*H, r). Opaque to torch.compile (the keys' count is only read here). Two matmuls a row, over views of its
    cache rows: the twin of the one-pass C++ kernel `r1kit_cpu::latent_attention` (csrc/decode_attention.cpp)."""
    B, T = positions.shape
    out = qq.new_empty(B, qq.shape[1], rank)
    for b, (slot, last) in enumerate(zip(slots.tolist(), positions[:, -1].tolist())):
        keys = cache[slot, : last + 1].to(qq.dtype)  # (S, r + dr): a view of the row, a copy from a 16-bit cache
        scores = torch.mm(qq[b], keys.t())  # (T*H, S)
        if T > 1:
            hidden = torch.arange(last + 1, device=qq.device) > positions[b, :, None]  # (T, S)
            scores.masked_fill_(hidden.repeat_interleave(heads, 0), float("-inf"))
        probs = scores.softmax(dim=-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(keys.dtype)
        torch.mm(probs, keys[:, :rank], out=out[b])
    return out


@latent_attention.register_fake
def _latent_attention_fake(qq: Tensor, cache: Tensor, slots: Tensor, positions: Tensor, heads: int,
                           rank: int) -> Tensor:
    return qq.new_empty(qq.shape[0], qq.shape[1], rank)


def cpu_kernel(name: str):
    """The C++ op `r1kit_cpu.<name>` (built from csrc/, see `kernels`) when it has been built; else None."""
    lib = _KERNELS[name][0]
    built = kernels.LOADED.get(lib) if torch.compiler.is_compiling() else kernels.load(lib)
    if not built:
        return None
    op = getattr(torch.ops.r1kit_cpu, name)
    if not getattr(op, "_r1kit_fake", False):  # shapes for torch.compile, registered once
        torch.library.register_fake(f"r1kit_cpu::{name}")(_KERNELS[name][1])
        op._r1kit_fake = True
    return op


def decode_kernel(name: str, cache: Tensor | None = None, dtype: torch.dtype = torch.float32):
    """The C++ decode-attention op `name` (csrc/decode_attention.cpp: one pass over the keys, split across threads)
    when it can serve `cache` (float32, float16 or bfloat16, contiguous, on CPU) for queries of `dtype` (float32)
    and has been built; else None."""
    if dtype != torch.float32 or cache is not None and (
            cache.dtype not in CACHE_DTYPES or not cache.is_contiguous() or cache.device.type != "cpu"):
        return None
    return cpu_kernel(name)


CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the caches the decode kernels read


_KERNELS = {  # op -> (source file in csrc/, its shapes for torch.compile)
    "latent_attention": ("decode_attention", _latent_attention_fake),
    "gqa_attention": ("decode_attention", lambda q, k_cache, v_cache, slots, positions: torch.empty_like(q)),
    "small_linear": ("linear", lambda x, w, bias, packed: x.new_empty(*x.shape[:-1], w.shape[0])),
    "small_linear2": ("linear", lambda x, w0, b0, w1, b1, p0, p1: tuple(
        x.new_empty(*x.shape[:-1], w.shape[0]) for w in (w0, w1))),
    "small_linear3": ("linear", lambda x, w0, b0, w1, b1, w2, b2, p0, p1, p2: tuple(
        x.new_empty(*x.shape[:-1], w.shape[0]) for w in (w0, w1, w2))),
    "pack_panels": ("linear", lambda w: w.new_empty(-(-w.shape[0] // 16) * w.shape[1] * 16 + 4)),
    "small_experts": ("linear", lambda x, gate_up, down, indices, weights: torch.empty_like(x)),
}


class Attention(nn.Module):
    """Grouped-query attention of Qwen2 / Llama."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), ctx.cos, ctx.sin, interleaved=False)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin, interleaved=False)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if ctx.cache is not None:
            kbuf, vbuf = ctx.cache.layers[self.layer_idx]
            attend = decode_kernel("gqa_attention", kbuf, q.dtype) if T <= 8 and vbuf.is_contiguous() else None
            if attend is not None:  # in the cache rows themselves, nothing gathered
                ctx.store_heads(kbuf, k), ctx.store_heads(vbuf, v)
                return self.o_proj(self._fold(attend, q * self.head_dim**-0.5, kbuf, vbuf, ctx.rows(B), ctx.positions))
            k, v = ctx.write_heads(kbuf, k), ctx.write_heads(vbuf, v)  # (B, Hkv, S, D)
            if T <= 8 and ctx.bias is not None:
                return self.o_proj(self._fold(self._decode, q, k, v, ctx.bias))
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _fold(self, attend, q: Tensor, *args) -> Tensor:
        """A few queries (B, T, H, D): the G = H / Hkv heads that share a key head fold into its query rows, t-major,
        so nothing is expanded per head; `attend((B, Hkv, T*G, D), *args)` -> the same shape. -> (B, T, H * D)."""
        B, T, H, D = q.shape
        Hkv = self.n_kv_heads
        G = H // Hkv
        o = attend(q.view(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * G, D), *args)
        return o.view(B, Hkv, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, H * D)

    @staticmethod
    def _decode(qq: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Folded query rows (B, Hkv, T*G, D) over gathered keys and values (B, Hkv, S, D), with `bias` (B, T, 1, S):
        the twin of the C++ kernel."""
        B, Hkv, TG, D = qq.shape
        S, T = k.shape[2], bias.shape[1]
        mask = bias.view(B, 1, T, 1, S).expand(B, 1, T, TG // T, S).reshape(B, 1, TG, S)
        scores = torch.matmul(qq, k.transpose(-1, -2)) * D**-0.5 + mask  # (B, Hkv, T*G, S)
        return torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)


# --------------------------------------------------------------------------------------------------- MoE
class Gate(nn.Module):
    """Router: affinity scores, group-limited top-k selection (biased for balance), routing weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            # Updated by a rule, not by gradients (V3 §2.1.2), so a buffer: optimizers never see it.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # The balancing bias moves in steps of ~1e-3: keep it fp32 when the model is cast to bf16.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, dim) -> routing weights (N, k), expert indices (N, k), affinity scores (N, E)."""
        N, E = x.shape[0], self.n_experts
        logits = F.linear(x.float(), self.weight.float())  # (N, E), fp32 as the checkpoints were trained
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.unsqueeze(-1).expand_as(grouped).reshape(N, E), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.routed_scaling_factor).to(x.dtype), indices, scores


@torch.library.custom_op("r1kit::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x grouped by expert (group e ends at offsets[e]) times w[e]: (N, d) x (E, d, n) -> (N, n).

    One matmul per non-empty group. An opaque op to torch.compile, so the graph around it keeps static shapes
    (the group sizes are only read here); `torch._grouped_mm` on CPU also visits every empty group."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
            start = end
    return out


@grouped_mm.register_fake
def _(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


class Experts(nn.Module):
    """Routed experts stacked as (E, 2I, dim) gate+up and (E, dim, I) down, for grouped compute."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, I, D = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.n_experts, self.inter = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "grouped"  # or "looped": the slow reference

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        if self.impl == "looped":  # the reference of `grouped` and `inference`, and of the C++ kernel
            return self.looped(x, weights, indices)
        if not torch.is_grad_enabled() and x.device.type == "cpu":
            return self.inference(x, weights, indices)
        return self.grouped(x, weights, indices)

    def inference(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """No-grad CPU path: one grouped matmul per projection over (token, expert) pairs sorted by expert.
        Every shape is static (no host sync), so a compiled decode step is a single graph."""
        N, K = indices.shape
        E, I = self.n_experts, self.inter
        compiling = torch.compiler.is_compiling()
        if (x.dtype == torch.float32 and self.gate_up_proj.dtype == torch.float32
                and (8 * E if compiling else 0) < N * K <= 128 * E):
            # csrc/linear.cpp: each picked expert's weights read once for all its tokens, in the decode step's
            # small-M tiles. Per MoE layer (16 experts, top-2, dim 256), against the eager paths below: 21 against
            # 392 us for 1 token, 146 against 1,478 for 16, 3.0 against 5.1 ms for 512. Inside a compiled graph the
            # fused product-sums below are faster up to 8 pairs an expert (29 against 42 us for 1 token).
            op = cpu_kernel("small_experts")
            if op is not None:
                return op(x, self.gate_up_proj, self.down_proj, indices, weights)
        if compiling and N * K <= 8 * E:
            # A compiled decode or verify step: each (token, expert) pair as a product-and-sum over its expert's
            # weights, which inductor fuses into one pass over the picked weights with no copy and no host sync.
            # Measured per MoE layer (16 experts, top-2): 0.23 -> 0.06 ms for 1 token, 0.73 -> 0.19 ms for 16, 1.3
            # -> 1.1 ms for 128; grouped matmuls win from about 16 pairs an expert. Eager, the same code would build
            # the whole product in memory.
            flat = indices.flatten()
            xs = x.repeat_interleave(K, dim=0)  # (N*K, dim): pair p is token p // K
            h = (xs.unsqueeze(1) * self.gate_up_proj[flat]).sum(-1)  # (N*K, 2I)
            h = F.silu(h[:, :I]) * h[:, I:]
            ys = (h.unsqueeze(1) * self.down_proj[flat]).sum(-1)  # (N*K, dim)
            return (ys.view(N, K, -1) * weights.to(x.dtype).unsqueeze(-1)).sum(1)
        if N * K >= E and N * E * 3 * I * x.shape[1] <= 2**26:
            # A small batch that reaches most experts anyway (a decode step): run every expert on every token as two
            # large matmuls, with the unpicked experts weighted 0, instead of two small matmuls per expert.
            h = F.linear(x, self.gate_up_proj.view(E * 2 * I, -1)).view(N, E, 2 * I)
            gates = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter_(1, indices, weights.to(x.dtype))
            h = F.silu(h[..., :I]) * h[..., I:] * gates.unsqueeze(-1)
            return torch.bmm(h.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        experts = torch.arange(E, device=x.device)
        offsets = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)  # end of each group
        h = grouped_mm(x.index_select(0, token), self.gate_up_proj.transpose(-2, -1), offsets)  # (N*K, 2I)
        h = F.silu(h[:, :I]) * h[:, I:]
        ys = grouped_mm(h, self.down_proj.transpose(-2, -1), offsets) * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def grouped(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Sort (token, expert) pairs by expert and run each expert once on its contiguous block of tokens."""
        N, K = indices.shape
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)
        token = order // K  # token of each sorted pair
        xs = x.index_select(0, token)  # (N*K, dim), grouped by expert; its backward is an index_add
        counts = torch.bincount(flat, minlength=self.n_experts)
        if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            offsets = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offsets)  # (N*K, 2I)
            h = F.silu(h[:, : self.inter]) * h[:, self.inter :]
            ys = torch._grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offsets)
        else:
            sizes = counts.tolist()
            if self.n_experts >= 32 and max(sizes) * self.n_experts <= 2 * N * K:
                ys = self._padded(xs, flat[order], counts, max(sizes))
            else:
                # unbind once: indexing a stacked parameter per expert would give each expert a full-size
                # gradient buffer to add up in the backward pass
                gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
                outs = []
                for e, xe in enumerate(xs.split(sizes)):
                    if xe.shape[0]:
                        h = F.linear(xe, gate_up[e])  # (n_e, 2I)
                        outs.append(F.linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], down[e]))
                ys = torch.cat(outs)  # (N*K, dim)
        ys = ys * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def _padded(self, xs: Tensor, expert: Tensor, counts: Tensor, capacity: int) -> Tensor:
        """Many experts, fairly balanced: pad each expert's block to the largest and run two batched matmuls
        instead of two small ones per expert (at most 2x the FLOPs, by the caller's check)."""
        start = counts.cumsum(0) - counts
        row = torch.arange(xs.shape[0], device=xs.device) - start[expert]  # place within its expert's block
        buf = xs.new_zeros(self.n_experts, capacity, xs.shape[1]).index_put((expert, row), xs)  # (E, C, dim)
        h = torch.bmm(buf, self.gate_up_proj.transpose(1, 2))  # (E, C, 2I)
        h = F.silu(h[..., : self.inter]) * h[..., self.inter :]
        return torch.bmm(h, self.down_proj.transpose(1, 2))[expert, row]  # (N*K, dim)

    def looped(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Reference: every expert, every token, weighted by whether the router picked it."""
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            w_e = (weights * (indices == e)).sum(dim=-1, keepdim=True)  # (N, 1); 0 where e was not chosen
            h = F.linear(x, self.gate_up_proj[e])
            out = out + w_e * F.linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], self.down_proj[e])
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None
        self.aux_loss_alpha = config.aux_loss_alpha
        self.aux_loss: Tensor | None = None
        # Tokens routed to each expert since the last bias update (summed over micro-batches; all-reduced later).
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(flat)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.gate.n_experts)
            self.aux_loss = self._balance_loss(scores.view(B, T, -1), indices.view(B, T, -1)) if self.aux_loss_alpha else None
        out = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, D)

    def _balance_loss(self, scores: Tensor, indices: Tensor) -> Tensor:
        """Sequence-wise balance loss (V3 eq. 17-20): alpha * sum_i f_i * P_i, averaged over sequences."""
        B, T, E = scores.shape
        K = indices.shape[-1]
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.reshape(B, T * K), torch.ones(B, T * K, device=scores.device))
        f = hits * E / (K * T)  # (B, E)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()


@torch.no_grad()
def update_balancing_bias(model: nn.Module, speed: float = 1e-3) -> dict[str, float]:
    """Auxiliary-loss-free balancing (V3 §2.1.2): after an optimizer step, move each expert's selection bias by
    `speed` towards balance (down if it got more than the mean load, up if less), then reset the counts.

    Counts are summed over every micro-batch since the last call and, under torch.distributed, over ranks, so each
    rank applies the identical update. Returns the mean max-load violation (max load / mean load - 1).
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return {}
    counts = torch.stack([m.tokens_per_expert for m in moes])  # (n_moe_layers, E)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    mean = counts.mean(dim=-1, keepdim=True)
    for m, c, mu in zip(moes, counts, mean):
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias += speed * torch.sign(mu - c)
        m.tokens_per_expert.zero_()
    violation = (counts.amax(dim=-1) / mean.squeeze(-1).clamp_min(1e-9) - 1).mean()
    return {"max_violation": float(violation)}


# ------------------------------------------------------------------------------------------ blocks, model
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx) if config.is_mla else Attention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(Block):
    """One multi-token-prediction module: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), then a block."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, h: Tensor, emb: Tensor, ctx: Context) -> Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, ctx)


class Transformer(nn.Module):
    """Decoder-only LM. `model(input_ids)` -> logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # MTP modules share the embedding and output head with the main model (V3 §2.2).
        self.mtp = nn.ModuleList(MTPLayer(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_parameters(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (Gate, Experts)):
            for p in m.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    def context(self, positions: Tensor, dtype: torch.dtype, cache: KVCache | None = None,
                slots: Tensor | None = None, kv_len: int | None = None, doc_ids: Tensor | None = None) -> Context:
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, rope_dim/2)
        a = self.rope_attention_factor
        ctx = Context((freqs.cos() * a).to(dtype), (freqs.sin() * a).to(dtype), positions, cache, slots)
        if cache is None and doc_ids is not None:  # packed documents: causal within each, blind across them
            T = doc_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            visible = (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(1)) & causal  # (B, T, T)
            ctx.mask = visible.unsqueeze(1)
            ctx.bias = torch.zeros(visible.shape, dtype=torch.float32, device=doc_ids.device).masked_fill_(
                ~visible, float("-inf")).unsqueeze(2)
        if cache is not None:
            ctx.kv_len = kv_len if kv_len is not None else int(positions.max()) + 1
            keys = torch.arange(ctx.kv_len, device=positions.device)
            visible = keys <= positions.unsqueeze(-1)  # (B, T, S)
            ctx.mask = visible.unsqueeze(1)  # (B, 1, T, S)
            ctx.bias = torch.zeros(visible.shape, dtype=torch.float32, device=positions.device).masked_fill_(
                ~visible, float("-inf")).unsqueeze(2)  # (B, T, 1, S)
        return ctx

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None, kv_len: int | None = None, head: bool = True,
                doc_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or the final normalised hidden states if head=False.

        Without a cache, attention is causal over the input; with `doc_ids` (B, T), also only within each
        document (packed training rows; pass each document's own `positions`). With one, each row's tokens are written at
        `positions` (default 0..T-1) of its cache slot and attend to every cached key at or before them.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        ctx = self.context(positions, x.dtype, cache, slots, kv_len, doc_ids)
        for layer in self.model.layers:
            x = layer(x, ctx)
        h = self.model.norm(x)
        return self.lm_head(h) if head else h

    def mtp_forward(self, hidden: Tensor, input_ids: Tensor, positions: Tensor | None = None,
                    doc_ids: Tensor | None = None) -> list[Tensor]:
        """Training-time MTP: logits of depth k (1..D) at position i predict token i+k+1.

        hidden (B, T, dim) is the main model's final normalised hidden state; depth k sees T-k positions.
        Returns D tensors, the k-th of shape (B, T-k, vocab).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        out, h = [], hidden
        for k, layer in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])  # token i+k joins representation i
            h = h[:, : T - k] if h.shape[1] > T - k else h
            ctx = self.context(positions[:, : T - k], h.dtype, doc_ids=None if doc_ids is None else doc_ids[:, : T - k])
            h = layer(h, emb, ctx)
            out.append(self.lm_head(layer.shared_head.norm(h)))
        return out

    def aux_loss(self) -> Tensor | None:
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def set_impl(self, attention: str | None = None, experts: str | None = None) -> Transformer:
        """Pick the MLA path ("naive" / "absorbed" / "auto") or the experts path ("grouped" / "looped")."""
        for m in self.modules():
            if attention and isinstance(m, MLA):
                m.impl = attention
            if experts and isinstance(m, Experts):
                m.impl = experts
        return self


def dense_decoder(model: Transformer, cache: KVCache):
    """A whole decode step of a dense model in C++ (`torch.classes.r1kit_cpu.DenseDecoder`, csrc/decode_step.cpp)
    over `model`'s weights and the main layers of `cache`: `.step(tokens, positions, slots, greedy)` (lists of ints,
    one entry a sequence) -> (logits (B, V) float32, their argmax (B,) or an empty tensor). Its twin is
    `model(tokens, positions=..., cache=..., slots=...)`. None unless it can serve them: Qwen2 / Llama layers, float32
    contiguous weights on CPU, a cache the attention kernel reads, the kernels built. It holds the tensors, not copies:
    updates in place show; a replaced weight or pack needs a new one."""
    c = model.config
    params = list(model.parameters())
    if (c.is_mla or cache.dtype not in CACHE_DTYPES or not params
            or any(p.device.type != "cpu" or p.dtype != torch.float32 or type(p.data) is not torch.Tensor
                   or not p.is_contiguous() for p in params)):
        return None
    layers = list(model.model.layers)
    if not all(isinstance(b.self_attn, Attention) and type(b.mlp) is MLP for b in layers):
        return None
    norms = [n for b in layers for n in (b.input_layernorm, b.post_attention_layernorm)] + [model.model.norm]
    if any(n.eps != c.rms_norm_eps for n in norms) or not all(
            cpu_kernel(k) for k in ("small_linear", "small_linear2", "small_linear3", "gqa_attention")) or not (
            kernels.load("decode_step")):
        return None
    none = torch.empty(0)

    def proj(p: Linear) -> list[Tensor]:
        return [p.weight, none if p.bias is None else p.bias, none if p.packed is None else p.packed]

    tensors = [model.model.embed_tokens.weight, model.model.norm.weight, *proj(model.lm_head)[::2], model.inv_freq]
    for i, b in enumerate(layers):
        a, m = b.self_attn, b.mlp
        tensors += [b.input_layernorm.weight, b.post_attention_layernorm.weight]
        for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            tensors += proj(p)
        tensors += list(cache.layers[i])
    return torch.classes.r1kit_cpu.DenseDecoder(
        tensors, [c.num_attention_heads, c.num_key_value_heads, c.head_dim],
        [c.rms_norm_eps, model.rope_attention_factor])


# ------------------------------------------------------------------------------------------------ the loss
class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (hidden @ weight.T) computed chunk by chunk, with its gradients taken in the same pass.

    The (tokens, vocab) logits are never held whole: each chunk's logits become its softmax in place, then its
    gradient, and are gone. Same matmuls as the unfused loss, a fraction of the memory traffic.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, reduction: str, chunk: int):
        N = h.shape[0]
        valid = targets != ignore_index
        tgt = targets.clamp_min(0)
        norm = valid.sum().clamp_min(1).to(torch.float32) if reduction == "mean" else torch.ones((), device=h.device)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            hc, tc, vc = h[s : s + chunk], tgt[s : s + chunk], valid[s : s + chunk]
            logits = (hc @ w.t()).float()  # (c, V)
            lse = logits.logsumexp(dim=-1)
            picked = logits.gather(1, tc.unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * vc).sum()
            if need_grad:
                g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                g.mul_((vc / norm).unsqueeze(1))
                g = g.to(h.dtype)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[s : s + chunk])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total / norm

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out, None if grad_w is None else grad_w * grad_out,
                None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int = 1024) -> Tensor:
    """Cross-entropy of the logits hidden @ weight.T against targets, without materialising the logits.

    hidden (..., dim), targets (...) with `ignore_index` where nothing is predicted; "mean" averages over the
    targets that count, "sum" adds them. Equal to F.cross_entropy(hidden @ weight.T, targets) (tested).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'sum'")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                     ignore_index, reduction, chunk)


# ------------------------------------------------------------------------------------------ public API
def build(config: ModelConfig, device=None, dtype=None) -> Transformer:
    """A randomly initialised model for `config`."""
    model = Transformer(config)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def load(path, device=None, dtype=None) -> Transformer:
    """Load a Hugging Face-layout checkpoint directory (see `r1kit.checkpoint.load_model`)."""
    from r1kit.checkpoint import load_model

    return load_model(path, device=device, dtype=dtype)


def save(model: Transformer, path, tokenizer=None) -> None:
    """Write `model` (and its tokenizer, when given or attached as `model.tokenizer`) in Hugging Face layout."""
    from r1kit.checkpoint import save_model

    save_model(model, path, tokenizer=tokenizer)


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters; see `r1kit.checkpoint.count_params`."""
    from r1kit.checkpoint import count_params as _count

    return _count(config)
