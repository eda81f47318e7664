"""Hugging Face-layout checkpoints: `config.json` + safetensors, read and written with identical logits.

Loads what DeepSeek ships (per-expert tensors, MTP modules at layer index num_hidden_layers + k with their own
copies of the embedding and head, FP8 e4m3 weights with 128x128 block scales in `weight_scale_inv`) and what
transformers writes (the same per-expert layout, configs in its own dialect, MTP declared but absent).
Only safetensors is ever read: no pickle, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from r1kit.config import ModelConfig
from r1kit.model import MoE, Transformer

log = logging.getLogger(__name__)

EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
FP8_BLOCK = 128


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds tensors that do not match its config."""


# ------------------------------------------------------------------------------------------------- reading
def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise CheckpointError(f"{path}: no *.safetensors files (found: {found}); r1kit never loads pickled weights")
    return files


def _dequant_fp8(w: Tensor, scale_inv: Tensor, dtype: torch.dtype) -> Tensor:
    """FP8 weight (M, N) with one scale per 128x128 block (ceil(M/128), ceil(N/128)) -> dtype."""
    M, N = w.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:M].repeat_interleave(FP8_BLOCK, 1)[:, :N]
    return (w.float() * s).to(dtype)


def read_state_dict(path: str | Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Read a checkpoint's tensors and map them onto r1kit's parameter names (stacked experts, `mtp.k`)."""
    path = Path(path)
    L = config.num_hidden_layers
    raw: dict[str, Tensor] = {}
    for f in _tensor_files(path):
        if not f.exists():
            raise CheckpointError(f"{f}: listed in the index but missing")
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    scales = {k[: -len("_scale_inv")]: raw.pop(k) for k in list(raw) if k.endswith(".weight_scale_inv")}
    experts: dict[str, dict[int, dict[str, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out: dict[str, Tensor] = {}
    for k, t in raw.items():
        if k in scales:
            t = _dequant_fp8(t, scales[k], dtype)
        elif t.is_floating_point() and not k.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        m = LAYER_KEY.match(k)
        if m and int(m.group(1)) >= L:  # an MTP module, stored after the main layers
            depth, rest = int(m.group(1)) - L, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # DeepSeek ships copies of the shared embedding / head; r1kit shares the originals
            k = f"mtp.{depth}.{rest}"
        e = EXPERT_KEY.match(k)
        if e:
            experts[e.group(1)][int(e.group(2))][e.group(3)] = t
        else:
            out[k] = t
    for prefix, per_expert in experts.items():
        n = max(per_expert) + 1
        missing = [i for i in range(n) if len(per_expert.get(i, {})) != 3]
        if missing:
            raise CheckpointError(f"{path}: {prefix}: experts {missing[:8]} lack one of gate_proj/up_proj/down_proj")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[i]["gate_proj"], per_expert[i]["up_proj"]], dim=0) for i in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[i]["down_proj"] for i in range(n)])
    return out


def load_model(path: str | Path, device=None, dtype=None) -> Transformer:
    """Build the model `path/config.json` describes and fill it from the safetensors beside it.

    dtype defaults to the checkpoint's declared `torch_dtype`; the balancing bias always stays fp32.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected config.json + *.safetensors)")
    config = ModelConfig.load(path)
    dtype = dtype or getattr(torch, config.torch_dtype)
    state = read_state_dict(path, config, dtype)
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        log.warning("%s declares num_nextn_predict_layers=%d but holds no MTP weights; loading without MTP",
                    path, config.num_nextn_predict_layers)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if "lm_head.weight" in tied:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{len(keys)} {name}: " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        raise CheckpointError(f"{path}: tensors do not match config.json — " + "; ".join(parts))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model)
    return model.to(device=device) if device is not None else model


def _materialize_buffers(model: Transformer) -> None:
    """Buffers that are not saved (RoPE frequencies, expert counters) are rebuilt after a meta-device build."""
    from r1kit.model import rope_parameters

    model.inv_freq = rope_parameters(model.config)[0]
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert = torch.zeros(m.gate.n_experts)


# ------------------------------------------------------------------------------------------------- writing
def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """r1kit's parameters under the names and shapes of a Hugging Face / DeepSeek checkpoint."""
    config = model.config
    L = config.num_hidden_layers
    out: dict[str, Tensor] = {}
    for k, t in model.state_dict().items():
        if k.startswith("mtp."):
            depth, rest = k.split(".", 2)[1:]
            k = f"model.layers.{L + int(depth)}.{rest}"
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = k[: -len(".gate_up_proj")], t.shape[1] // 2
            for i in range(t.shape[0]):
                out[f"{prefix}.{i}.gate_proj.weight"] = t[i, :inter].clone()
                out[f"{prefix}.{i}.up_proj.weight"] = t[i, inter:].clone()
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for i in range(t.shape[0]):
                out[f"{prefix}.{i}.down_proj.weight"] = t[i].clone()
        else:
            out[k] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for depth in range(len(model.mtp)):  # DeepSeek's layout gives each MTP module its own embedding and head
        out[f"model.layers.{L + depth}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{L + depth}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_model(model: Transformer, path: str | Path, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json, generation_config.json, safetensors (sharded with an index above max_shard_bytes)
    and the tokenizer, into a temporary directory renamed over `path`: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.cpu() for k, v in hf_state_dict(model).items()}
        dtype = next((t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
        config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
        config.save(tmp / "config.json")
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}  # the sampling R1's model card recommends
        if config.pad_token_id is not None:
            gen["pad_token_id"] = config.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_shards(state, tmp, max_shard_bytes)
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(src: str | Path, dst: str | Path, *, dtype: str | None = None, chat_template: str | None = None,
           mtp: bool = True) -> dict:
    """A copy of checkpoint `src` that vLLM, SGLang and transformers load as it is: Hugging Face layout (config.json
    naming the architecture, safetensors, generation_config.json) and the tokenizer with its chat template.

    `dtype` casts the weights (bfloat16 halves them; the balancing bias stays fp32). `chat_template` makes a named
    template (r1, r1-zero, or one of the tokenizer's own) the default one, which is what servers apply: an R1-Zero
    model wants "r1-zero". `mtp=False` drops the MTP modules (servers that do not speculate ignore them anyway).
    Returns what was written and the commands that serve it.
    """
    from r1kit import tokenizer as T

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: export into a new directory, not over its source")
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected config.json + *.safetensors + tokenizer.json)")
    if not (src / "tokenizer.json").exists():
        raise CheckpointError(f"{src}: no tokenizer.json; servers need the tokenizer beside the weights")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise CheckpointError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    model = load_model(src, dtype=getattr(torch, dtype) if dtype else None)
    tok = T.load(src)
    if chat_template:
        try:
            tok.set_default_template(chat_template)
        except ValueError as e:
            raise CheckpointError(f"chat_template: {e}") from None
    if not mtp and len(model.mtp):
        model.mtp = type(model.mtp)()
        model.config = model.config.replace(num_nextn_predict_layers=0)
    save_model(model, dst, tokenizer=tok)
    cfg = model.config
    arch = cfg.to_hf()["architectures"][0]
    total, active = count_params(cfg)
    name = dst.name
    serve = {
        "vllm": f"vllm serve {dst} --served-model-name {name} --reasoning-parser deepseek_r1"
                + (f" --speculative-config '{{\"method\": \"deepseek_mtp\", \"num_speculative_tokens\": 1}}'"
                   if cfg.num_nextn_predict_layers else ""),
        "sglang": f"python -m sglang.launch_server --model-path {dst} --served-model-name {name} "
                  f"--reasoning-parser deepseek-r1",
        "r1kit": f"r1kit serve {dst}",
    }
    return {"path": str(dst), "architecture": arch, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "params_total": total, "params_active_per_token": active, "mtp_modules": len(model.mtp),
            "files": sorted(f.name for f in dst.iterdir()), "serve": serve}


def _write_shards(state: dict[str, Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out, never half-overwritten."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- counting
def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the main model, counted as DeepSeek reports them.

    Total excludes the MTP modules (V3: 671B, 685B with MTP). Active excludes the routed experts a token does
    not visit and the input embedding, a lookup rather than a matmul (V3: 36.6B, "37B"; V2-Lite: 2.45B, "2.4B").
    """
    with torch.device("meta"):
        model = Transformer(config.replace(num_nextn_predict_layers=0))
    total = sum(p.numel() for p in model.parameters())
    inactive = 0 if config.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
            inactive += (m.gate.n_experts - m.gate.top_k) * per_expert
    return total, total - inactive
