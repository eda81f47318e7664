"""Training throughput and MoE scaling: r1kit vs transformers' DeepseekV3ForCausalLM, side by side in one run.

Same config (the tiny DeepSeek-V3 of shared/BASELINES.md), same weights (r1kit loads the transformers
checkpoint), same batch (8 x 256 random tokens), fp32, 2 threads. Reports forward+backward tokens/s and MFU
against the fp32 matmul peak measured in this run, and forward time as routed experts go 8 -> 16 -> 64 at top-2.

FLOPs per token follow the PaLM convention the peers' numbers used: 6 x active non-embedding parameters
+ 6 x layers x heads x seq x (d_qk + d_v), no causal discount.

    .venv/bin/python bench/train.py [--quick]      # prints a table and writes bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import r1kit.model as M

torch.set_num_threads(2)
B, S = 8, 256


def hf_config(**kw):
    from transformers import DeepseekV3Config

    base = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
                num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128, intermediate_size=512,
                n_group=1, topk_group=1, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    return DeepseekV3Config(**{**base, **kw})


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Median fp32 GFLOP/s of an n^3 matmul into a preallocated output (as shared/anchors/b4 measures it)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def flops_per_token(cfg) -> float:
    total, active = M.count_params(cfg)  # active excludes the embedding lookup; the head is counted
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return 6 * active + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * S * (d_qk + cfg.v_head_dim)


def median_time(fn, warm: int, reps: int) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pair(E: int = 16):
    """The transformers model and r1kit's load of the same checkpoint."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_config(n_routed_experts=E))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = M.load(d)
    return hf, ours


def train_step_fn(model, x, is_hf: bool):
    def step():
        if is_hf:
            loss = model(input_ids=x, labels=x).loss
        else:
            targets = F.pad(x[:, 1:], (0, 1), value=-100)  # next token; nothing to predict after the last
            loss = M.linear_cross_entropy(model(x, head=False), model.lm_head.weight, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    warm, reps = (1, 3) if args.quick else (2, 5)
    import transformers

    peak = matmul_peak_gflops()
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": 2, "batch": B, "seq": S,
           "fp32_peak_gflops": peak}
    hf, ours = pair()
    hf.train(), ours.train()
    x = torch.randint(3, 4096, (B, S))
    fpt = flops_per_token(ours.config)
    for name, model in (("transformers", hf), ("r1kit", ours)):
        t = median_time(train_step_fn(model, x, name == "transformers"), warm, reps)
        res[name] = {"fwd_bwd_s": t, "tokens_per_s": B * S / t, "mfu": fpt * B * S / t / 1e9 / peak}
        print(name, json.dumps(res[name]), flush=True)
    res["speedup_fwd_bwd"] = res["transformers"]["fwd_bwd_s"] / res["r1kit"]["fwd_bwd_s"]

    res["moe_scaling"] = {}
    for E in (8, 16, 64):
        hf, ours = pair(E)
        hf.eval(), ours.eval()
        row = {}
        for name, model in (("transformers", hf), ("r1kit", ours)):
            with torch.inference_mode():
                row[name] = median_time(lambda: model(x), warm, reps)
        res["moe_scaling"][E] = row
        print("experts", E, json.dumps(row), flush=True)
    for name in ("transformers", "r1kit"):
        s = res["moe_scaling"]
        res[f"{name}_growth_8_to_64"] = s[64][name] / s[8][name] - 1

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "train.json").write_text(json.dumps(res, indent=1) + "\n")
    print()
    print(f"fp32 matmul peak             {peak:8.1f} GFLOP/s")
    print(f"fwd+bwd tokens/s             transformers {res['transformers']['tokens_per_s']:8.0f}   "
          f"r1kit {res['r1kit']['tokens_per_s']:8.0f}   ratio {res['speedup_fwd_bwd']:.2f}x")
    print(f"MFU                          transformers {res['transformers']['mfu']:8.2f}   r1kit {res['r1kit']['mfu']:8.2f}")
    for E, row in res["moe_scaling"].items():
        print(f"forward, {E:2d} experts (ms)    transformers {row['transformers'] * 1e3:8.1f}   "
              f"r1kit {row['r1kit'] * 1e3:8.1f}   ratio {row['transformers'] / row['r1kit']:.2f}x")
    print(f"growth 8 -> 64 experts       transformers {res['transformers_growth_8_to_64']:+8.1%}   "
          f"r1kit {res['r1kit_growth_8_to_64']:+8.1%}")


if __name__ == "__main__":
    main()
