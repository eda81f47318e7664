"""The GPU path, measured: training throughput and MFU of a ~0.9B-parameter DeepSeek-V3-style model, and decoding
with the engine. Needs a CUDA device; the CPU suite never runs it.

- bf16 matmul peak of this GPU (8192^3, median of 20) as the MFU denominator;
- training: bf16 autocast, fused AdamW, torch.compile (and eager, for the ratio), batch B x 2048 random tokens,
  next-token + MTP loss; tokens/s and MFU (6 x active parameters + attention, as bench/train.py counts);
- under torchrun with several GPUs, the same model FSDP2-sharded through r1kit.train (tokens/s over all ranks);
- decoding: the engine at batch 1 and 64 (bf16, latent cache, compiled step), tokens/s.

    .venv/bin/python bench/gpu.py [--steps 10] [--batch 8]        # writes bench/results/gpu.json
    torchrun --nproc-per-node 8 bench/gpu.py --fsdp
    .venv/bin/python bench/gpu.py --smoke                         # CPU, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import r1kit.model as M
from r1kit import config as C

SEQ = 2048


def config() -> C.ModelConfig:
    """~0.9B parameters (~0.2B active per token): 16 layers, MLA, 32 routed experts top-4 + 1 shared, one MTP."""
    return C.tiny(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, first_k_dense_replace=1,
                  num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                  moe_intermediate_size=512, intermediate_size=2816, max_position_embeddings=4096,
                  num_nextn_predict_layers=1)


def bf16_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(ts) / 1e12


def flops_per_token(cfg) -> float:
    _, active = M.count_params(cfg)
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return 6 * active + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * SEQ * (d_qk + cfg.v_head_dim)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_speed(cfg, batch: int, steps: int, compile: bool, device: str = "cuda", seq: int = SEQ) -> float:
    torch.manual_seed(0)
    model = M.build(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step_fn(x):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            h = model(x, head=False)
            tgt = F.pad(x[:, 1:], (0, 1), value=-100)
            loss = M.linear_cross_entropy(h, model.lm_head.weight, tgt)
            logits = model.mtp_forward(h, x)[0]
            loss = loss + 0.3 * F.cross_entropy(logits.flatten(0, 1).float(), F.pad(x[:, 2:], (0, 1), value=-100).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(step_fn) if compile else step_fn
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    for _ in range(3):  # warm-up (and compile)
        fn(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x)
        M.update_balancing_bias(model)
    _sync(device)
    return batch * seq * steps / (time.perf_counter() - t0)


def fsdp_speed(cfg, batch: int, steps: int) -> float:
    """Tokens/s over all ranks with r1kit's own training stage machinery (FSDP2, bf16, fused optimizer)."""
    import torch.distributed as dist

    from r1kit import train

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = M.build(cfg)
    run = train.Run(cfg=train.TrainConfig(parallel="fsdp", dtype="bfloat16"), stage="bench",
                    out=Path("/tmp/r1kit-gpu-bench"), rank=rank, world_size=world, local_rank=local,
                    device=torch.device(f"cuda:{local}"))
    module = train.parallelize(train.Objective(model, _loss), run)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, cfg.vocab_size, (batch, SEQ), device="cuda")
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tps = batch * SEQ * steps * world / (time.perf_counter() - t0)
    dist.destroy_process_group()
    return tps


def _loss(model, x):
    h = model(x, head=False)
    return M.linear_cross_entropy(h, model.lm_head.weight, F.pad(x[:, 1:], (0, 1), value=-100))


def decode_speed(cfg, batch: int, new: int = 256, device: str = "cuda", compile: bool = True) -> float:
    from r1kit.engine import LLM, SamplingParams

    torch.manual_seed(0)
    model = M.build(cfg).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    llm = LLM(model, max_num_seqs=batch, max_model_len=1024, compile=compile)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(torch.randint(3, cfg.vocab_size, (batch, 128)).tolist(), params)  # compile
    _sync(device)
    t0 = time.perf_counter()
    llm.generate(torch.randint(3, cfg.vocab_size, (batch, 128)).tolist(), params)
    _sync(device)
    return batch * new / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 across the GPUs")
    ap.add_argument("--smoke", action="store_true", help="run every measurement once on CPU with a tiny model "
                                                         "(checks the script, measures nothing)")
    args = ap.parse_args()
    if args.smoke:
        tiny = C.tiny(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, q_lora_rank=32,
                      kv_lora_rank=16, num_attention_heads=2, n_routed_experts=4, num_hidden_layers=2,
                      vocab_size=512, num_nextn_predict_layers=1)
        print(json.dumps({"train_tokens_per_s": train_speed(tiny, 2, 2, False, "cpu", seq=64),
                          "decode_tokens_per_s": decode_speed(tiny, 2, 8, "cpu", compile=False)}))
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; this benchmark needs a GPU", file=sys.stderr)
        return 2
    cfg = config()
    total, active = M.count_params(cfg)
    if args.fsdp:
        tps = fsdp_speed(cfg, args.batch, args.steps)
        print(json.dumps({"fsdp_tokens_per_s": tps}))
        return 0
    peak = bf16_peak_tflops()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "params_total": total,
           "params_active": active, "bf16_matmul_peak_tflops": peak}
    for name, comp in (("eager", False), ("compiled", True)):
        tps = train_speed(cfg, args.batch, args.steps, comp)
        res[f"train_{name}"] = {"tokens_per_s": tps, "mfu": tps * flops_per_token(cfg) / (peak * 1e12)}
        print(name, json.dumps(res[f"train_{name}"]), flush=True)
        torch.cuda.empty_cache()
    for b in (1, 64):
        res[f"decode_batch{b}_tokens_per_s"] = decode_speed(cfg, b)
        print(f"decode batch {b}", res[f"decode_batch{b}_tokens_per_s"], flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
