"""GRPO step time: r1kit vs TRL's GRPOTrainer, side by side in one run, on the same model, prompts and settings.

Same checkpoint: transformers' DeepseekV3ForCausalLM with the tiny config of shared/BASELINES.md (random init,
fp32) saved once; TRL loads it with from_pretrained, r1kit with r1kit.model.load. Same tokenizer: a byte-level
BPE trained locally (r1kit.tokenizer.train_bpe, vocab 512, the R1 chat template), which AutoTokenizer loads.
Same 64 prompts ("What is a + b?"), same reward (the fraction of digit characters, a Python function on both
sides), num_generations 8, temperature 1, beta 0, loss_type grpo, learning rate 1e-5, fp32 (TRL: bf16=False;
gradient checkpointing at TRL's default, as in the baseline), 2 threads.

Settings: 8 completions x <= 64 tokens per step (1 prompt x 8), and 16 x <= 256 (2 prompts x 8). Reports the
median seconds per optimizer step after the first, its split into generation / scoring / training, and the
training MFU: model FLOPs of the training forward+backward (6 x active non-embedding parameters per token, the
output head only where r1kit computes it, + attention 6 x layers x heads x seq x (d_qk + d_v), no causal
discount, as bench/train.py) over the training time, against the fp32 matmul peak measured in this run.

    .venv/bin/python bench/grpo.py [--steps 6] [--only r1kit|trl] [--profile] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import r1kit.model as M  # noqa: E402
from r1kit import tokenizer as T  # noqa: E402

SETTINGS = [(8, 64), (16, 256)]  # (completions per step, max completion tokens)
G = 8


def digit_fraction(completions, **_):
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else c
        out.append(sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def setup(root: Path) -> tuple[Path, Path, list[dict]]:
    """The shared checkpoint (model + tokenizer) and the prompts, as a JSONL task for r1kit."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rng = random.Random(0)
    lines = []
    for _ in range(4000):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-*")
        val = eval(f"{a}{op}{b}")  # noqa: S307 - generated integers
        lines.append(f"What is {a} {op} {b}? Let me think. {a} {op} {b} = {val}. The answer is {val}.")
    tok = T.train_bpe(lines, vocab_size=512)
    cfg = DeepseekV3Config(
        vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=128, intermediate_size=512, n_group=1, topk_group=1, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_dir = root / "model"
    DeepseekV3ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save(model_dir)
    rows = []
    for _ in range(64):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data, rows


def flops(model_cfg, all_tokens: float, completion_tokens: float, seq: float) -> float:
    total, active = M.count_params(model_cfg)
    head = model_cfg.vocab_size * model_cfg.hidden_size
    d_qk = model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim
    attn = 6 * model_cfg.num_hidden_layers * model_cfg.num_attention_heads * seq * (d_qk + model_cfg.v_head_dim)
    return 6 * (active - head) * all_tokens + 6 * head * completion_tokens + attn * all_tokens


def run_r1kit(model_dir: Path, data: Path, bs: int, max_len: int, steps: int, out: Path, profile: bool) -> dict:
    from r1kit import train
    from r1kit.grpo import grpo

    kw = dict(model=str(model_dir), task=str(data), reward_funcs=[digit_fraction], num_generations=G,
              per_device_train_batch_size=bs, max_completion_length=max_len, max_steps=steps, learning_rate=1e-5,
              loss_type="grpo", beta=0.0, temperature=1.0, progress=False, resume="false", output_dir=str(out))
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            grpo(**kw)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    else:
        grpo(**kw)
    rows = train.read_metrics(out)[1:]
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    cfg = M.load(model_dir).config
    prompt_tokens = statistics.median(r["completion_tokens"] for r in rows)  # filled below
    res = {"step_s": med("step_s"), "generation_s": med("generation_s"), "scoring_s": med("scoring_s"),
           "training_s": med("training_s"), "completion_length": med("completion_length"),
           "completion_tokens": med("completion_tokens"), "reward": rows[-1]["reward"]}
    # the training forward runs on prompt + completion; prompts are ~the same length for every row
    tok = T.load(model_dir)
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}],
                                             add_generation_prompt=True, tokenize=True))
    all_tokens = res["completion_tokens"] + bs * prompt_len
    seq = prompt_len + res["completion_length"]
    res["train_tokens"] = all_tokens
    res["train_tflop"] = flops(cfg, all_tokens, res["completion_tokens"], seq) / 1e12
    del prompt_tokens
    return res


def run_trl(model_dir: Path, rows: list[dict], bs: int, max_len: int, steps: int, out: Path) -> dict:
    import datasets
    import trl
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                     for r in rows])
    prof = defaultdict(list)
    original = profiling.ProfilingContext._log_metrics

    def record(self, duration):
        prof[self.name].append((self.step, duration))
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = record

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.step_s, self.logs = None, [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    timer = Timer()
    cfg = GRPOConfig(output_dir=str(out), num_generations=G, per_device_train_batch_size=bs,
                     max_completion_length=max_len, max_steps=steps, logging_steps=1, report_to="none",
                     use_vllm=False, bf16=False, beta=0.0, loss_type="grpo", use_cpu=True, save_strategy="no",
                     learning_rate=1e-5, seed=0, dataloader_num_workers=0, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_fraction, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    try:
        trainer.train()
    finally:
        profiling.ProfilingContext._log_metrics = original
    by_step = defaultdict(lambda: defaultdict(float))
    for name, items in prof.items():
        for step, sec in items:
            by_step[step][name] += sec
    per_step = [v for _, v in sorted(by_step.items())][1:]
    gen = statistics.median(sum(s for n, s in v.items() if n.endswith("generate")) for v in per_step)
    rew = statistics.median(sum(s for n, s in v.items() if n.endswith("digit_fraction")) for v in per_step)
    step_s = statistics.median(timer.step_s[1:])
    lengths = [lg["completions/mean_length"] for lg in timer.logs if "completions/mean_length" in lg]
    return {"trl": trl.__version__, "step_s": step_s, "generation_s": gen, "scoring_s": rew,
            "training_s": step_s - gen - rew, "completion_length": statistics.median(lengths[1:] or lengths),
            "gradient_checkpointing": cfg.gradient_checkpointing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", choices=["r1kit", "trl"])
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the r1kit runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "fp32_peak_gflops": peak}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir, data, rows = setup(root)
        for bs, max_len in SETTINGS:
            key = f"{bs}x{max_len}"
            res[key] = {}
            if args.only != "trl":
                r = run_r1kit(model_dir, data, bs, max_len, args.steps, root / f"r1kit_{key}", args.profile)
                r["train_mfu"] = r["train_tflop"] * 1e3 / r["training_s"] / peak
                res[key]["r1kit"] = r
                print(key, "r1kit", json.dumps(r), flush=True)
            if args.only != "r1kit":
                r = run_trl(model_dir, rows, bs, max_len, args.steps, root / f"trl_{key}")
                res[key]["trl"] = r
                print(key, "trl", json.dumps(r), flush=True)
            if len(res[key]) == 2:
                res[key]["speedup"] = res[key]["trl"]["step_s"] / res[key]["r1kit"]["step_s"]
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "grpo.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nfp32 matmul peak {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    print(f"{'setting':10} {'':6} {'s/step':>8} {'generate':>9} {'score':>8} {'train':>8} {'len':>6} {'MFU':>6}")
    for bs, max_len in SETTINGS:
        key = f"{bs}x{max_len}"
        for side in ("trl", "r1kit"):
            r = res[key].get(side)
            if r:
                mfu = f"{r['train_mfu']:.2f}" if "train_mfu" in r else ""
                print(f"{key:10} {side:6} {r['step_s']:8.3f} {r['generation_s']:9.3f} {r['scoring_s']:8.4f} "
                      f"{r['training_s']:8.3f} {r['completion_length']:6.1f} {mfu:>6}")
        if "speedup" in res[key]:
            print(f"{key:10} r1kit is {res[key]['speedup']:.2f}x faster per step")


if __name__ == "__main__":
    main()
