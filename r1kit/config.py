"""Model configuration: one dataclass for DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense Qwen2 / Llama models.

Field names are Hugging Face's (`DeepseekV3Config`, `Qwen2Config`, `LlamaConfig`), so a `config.json` maps onto
the dataclass field by field. `ModelConfig.from_hf` reads every dialect in use — DeepSeek's own releases
(`rope_theta` + `rope_scaling`, `torch_dtype`) and what transformers 5 writes (`rope_parameters`, `dtype`,
a derived `head_dim`) — and `to_hf` writes the dialect that transformers, vLLM and SGLang all read.
Every value is checked at construction; a bad one raises `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")
DENSE_TYPES = ("qwen2", "llama")
MODEL_TYPES = DEEPSEEK_TYPES + DENSE_TYPES
ROPE_TYPES = ("default", "yarn", "llama3", "linear")


class ConfigError(ValueError):
    """A model or recipe configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512  # dense MLP width (dense layers of DeepSeek, every layer of Qwen2/Llama)
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # dense GQA only; MLA shares one latent across heads
    head_dim: int | None = None  # dense only; defaults to hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn" | "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on every attention projection (Llama's flag; DeepSeek's kv_a / q_a / o)
    qkv_bias: bool | None = None  # bias on q/k/v only (always on in Qwen2); None = the model type's default
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Multi-head latent attention (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE (DeepSeek-V3 §2.1.2)
    n_routed_experts: int | None = 16
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 2
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3, bias-corrected), "greedy" / "group_limited_greedy" (V2)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3 eq. 17-20); 0 = auxiliary-loss-free only
    seq_aux: bool = True
    # Multi-token prediction (DeepSeek-V3 §2.2)
    num_nextn_predict_layers: int = 0
    # Keys from config.json that r1kit does not use, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2" or self.attention_bias
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs.pop("type", None) or rs.get("rope_type", "default")
            rs.pop("rope_theta", None)
            self.rope_scaling = None if rs["rope_type"] == "default" else rs
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def is_mla(self) -> bool:
        return self.model_type in DEEPSEEK_TYPES

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.is_mla
            and bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def kv_cache_elements_per_token(self) -> int:
        """Cached elements per token per layer: MLA keeps the latent c_kv and the shared rotary key only."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    # ------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        need(self.model_type in MODEL_TYPES, "model_type", f"must be one of {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.hidden_act in ("silu", "swish"), "hidden_act", "only 'silu' (SwiGLU) is implemented")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type")
            if rt not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling.rope_type={rt!r}: must be one of {', '.join(ROPE_TYPES)}")
            f = self.rope_scaling.get("factor")
            if not (isinstance(f, (int, float)) and f >= 1):
                raise ConfigError(f"rope_scaling.factor={f!r}: must be a number >= 1")
        need(self.torch_dtype in ("float32", "bfloat16", "float16"), "torch_dtype", "must be float32, bfloat16 or float16")
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
            need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or a positive integer")
            need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "must be 'sigmoid' or 'softmax'")
            need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
                 "must be 'noaux_tc', 'greedy' or 'group_limited_greedy'")
            need(0 <= self.num_nextn_predict_layers <= 8, "num_nextn_predict_layers", "must be between 0 and 8")
            need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
            need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
            if self.n_routed_experts:
                E = self.n_routed_experts
                need(self.num_experts_per_tok is not None and 1 <= self.num_experts_per_tok <= E,
                     "num_experts_per_tok", f"must be between 1 and n_routed_experts={E}")
                need(self.n_group >= 1 and E % self.n_group == 0, "n_group",
                     f"must divide n_routed_experts={E}")
                need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group={self.n_group}")
                if self.topk_method == "noaux_tc" and self.n_group > 1:
                    need(E // self.n_group >= 2, "n_group",
                         f"noaux_tc scores a group by its top-2 experts, so each group needs >= 2 of the {E} experts")
                need(self.topk_group * (E // self.n_group) >= self.num_experts_per_tok, "topk_group",
                     f"the {self.topk_group} selected group(s) hold fewer experts than num_experts_per_tok="
                     f"{self.num_experts_per_tok}")
                need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be a positive integer")
                need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
                need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
            need(self.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")
        else:
            need(self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
                 "num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
            need(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "must be a positive even integer")
            need(self.intermediate_size > 0, "intermediate_size", "must be a positive integer")
            need(self.num_nextn_predict_layers == 0, "num_nextn_predict_layers", "MTP exists for deepseek models only")
        for tid in ("bos_token_id", "pad_token_id"):
            v = getattr(self, tid)
            need(v is None or 0 <= v < self.vocab_size, tid, f"must be a token id below vocab_size={self.vocab_size}")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                raise ConfigError(f"eos_token_id={self.eos_token_id!r}: must be token id(s) below vocab_size={self.vocab_size}")

    # ----------------------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict, whichever dialect wrote it."""
        d = dict(d)
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            arch = ", ".join(d.get("architectures") or []) or "?"
            raise ConfigError(f"{source}: model_type={mt!r} (architectures: {arch}) is not implemented by r1kit; "
                              f"supported: {', '.join(MODEL_TYPES)}")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (r1kit attends over the full context)")
        # transformers 5 keeps RoPE settings in `rope_parameters` (theta included); DeepSeek keeps them apart.
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and "rope_theta" in rp:
            d.setdefault("rope_theta", rp["rope_theta"])
        if isinstance(rp, dict) and d.get("rope_scaling") is None:
            d["rope_scaling"] = rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if d.get("torch_dtype") is None:
            d["torch_dtype"] = "float32"
        if mt in DEEPSEEK_TYPES:
            d.pop("head_dim", None)  # transformers derives it (= qk_rope_head_dim); not a free parameter for MLA
            d.pop("num_key_value_heads", None)
        if mt == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
        if mt in DENSE_TYPES:
            d.setdefault("num_nextn_predict_layers", 0)
        d.setdefault("num_nextn_predict_layers", 0)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k in ("num_mtp_layers",):  # transformers' alias
            if k in extra and "num_nextn_predict_layers" not in d:
                known["num_nextn_predict_layers"] = extra[k]
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        # Fields that describe what r1kit does not write (FP8 scales, another dialect's duplicates) are dropped.
        stale = {"quantization_config", "rope_parameters", "dtype", "transformers_version", "head_dim", "qk_head_dim",
                 "num_mtp_layers"}
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in stale}
        arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        out["architectures"] = [arch]
        out.update(d)
        del out["qkv_bias"]
        if self.is_mla:
            out["num_key_value_heads"] = self.num_attention_heads
            del out["head_dim"]
        else:
            for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "routed_scaling_factor",
                      "norm_topk_prob", "scoring_func", "topk_method", "aux_loss_alpha", "seq_aux",
                      "num_nextn_predict_layers"):
                del out[k]
            if self.model_type == "qwen2":
                del out["attention_bias"], out["mlp_bias"]
                out.setdefault("use_sliding_window", False)
        if self.rope_scaling is not None:  # DeepSeek and transformers both accept the legacy `type` key as well
            out["rope_scaling"] = {**self.rope_scaling, "type": self.rope_scaling["rope_type"]}
        return out

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file (a checkpoint directory needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        return cls.from_hf(d, source=str(p))

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        p.write_text(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------- presets
def tiny(**overrides) -> ModelConfig:
    """The tiny DeepSeek-V3 of `shared/BASELINES.md` (8.3M parameters without MTP): MLA + 16 experts, top-2."""
    return ModelConfig(**{**dict(
        model_type="deepseek_v3", vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
        intermediate_size=512, n_group=1, topk_group=1, max_position_embeddings=2048, routed_scaling_factor=1.0,
        num_nextn_predict_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ), **overrides})


def tiny_dense(**overrides) -> ModelConfig:
    """A small Qwen2-style dense student (GQA, QKV bias, tied embeddings)."""
    return ModelConfig(**{**dict(
        model_type="qwen2", vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True, max_position_embeddings=2048,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ), **overrides})


def deepseek_v3(**overrides) -> ModelConfig:
    """DeepSeek-V3 / R1 (671B total, 37B active), as in its released config.json."""
    return ModelConfig(**{**dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
        torch_dtype="bfloat16",
    ), **overrides})


def deepseek_v2_lite(**overrides) -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, 2.4B active): no query compression, softmax gate, 64 experts top-6."""
    return ModelConfig(**{**dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=False, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        scoring_func="softmax", topk_method="greedy", num_nextn_predict_layers=0, bos_token_id=100000,
        eos_token_id=100001, torch_dtype="bfloat16",
    ), **overrides})


PRESETS = {"tiny": tiny, "tiny-dense": tiny_dense, "deepseek-v3": deepseek_v3, "deepseek-v2-lite": deepseek_v2_lite}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: must be one of {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
