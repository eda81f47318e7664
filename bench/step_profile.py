"""Where a decode step's time goes at a short and a long context: torch.profiler's self time per op, per step.

The engine of bench/generate.py (compiled, packed), batch 1 (or --batch), stepped by hand; each context profiled
over 100 steps in `--rounds` rounds, the medians printed side by side with their difference. At 4,000 keys the
attention is not the only op that slows: its cache rows stream through the caches every layer and evict what the
other ops read. --sort-by-time lists the ops by their time at the short context instead (where a step's time goes).

    .venv/bin/python bench/step_profile.py [--model deepseek_v3|qwen2] [--contexts 32 4000] [--rounds 3]
    .venv/bin/python bench/step_profile.py --model qwen2 --batch 16 --contexts 32 256 --sort-by-time
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from generate import hf_pair, warm_up
from r1kit.engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek_v3", choices=["deepseek_v3", "qwen2"])
    ap.add_argument("--contexts", type=int, nargs=2, default=[32, 4000], metavar=("SHORT", "LONG"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="ops shown, the largest differences first")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (at most 16)")
    ap.add_argument("--sort-by-time", action="store_true", help="the largest at the short context first")
    args = ap.parse_args()
    if not 1 <= args.batch <= 16:
        ap.error(f"--batch must be 1..16, got {args.batch}")
    _, model = hf_pair(args.model)
    llm = LLM(model, max_num_seqs=16, max_model_len=max(args.contexts) + 200, compile=True, pack_weights=True)
    warm_up(llm, max(args.contexts))
    eng, steps = llm.engine, 100
    per_op: dict[str, dict[int, list[float]]] = {}
    for _ in range(args.rounds):
        for ctx in args.contexts:
            for _ in range(args.batch):
                eng.add_request(torch.randint(3, 4096, (ctx,)).tolist(),
                                SamplingParams(temperature=0, max_tokens=steps + 12, ignore_eos=True))
            for _ in range(11):  # admission (the prefill), then ten warm steps
                eng.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    eng.step()
            while eng.has_unfinished():
                eng.step()
            for e in prof.key_averages():
                per_op.setdefault(e.key, {}).setdefault(ctx, []).append(e.self_cpu_time_total / steps)
    short, long = args.contexts
    med = {k: [statistics.median(v.get(c, [0.0])) for c in (short, long)] for k, v in per_op.items()}
    total = [sum(m[i] for m in med.values()) for i in (0, 1)]
    print(f"{args.model}, batch {args.batch}: self time per step, us, at {short} and {long} keys "
          f"(medians of {args.rounds} rounds)")
    order = (lambda kv: -kv[1][0]) if args.sort_by_time else (lambda kv: -abs(kv[1][1] - kv[1][0]))
    for k, (a, b) in sorted(med.items(), key=order)[: args.top]:
        print(f"  {k[:56]:56s} {a:8.1f} {b:8.1f}  {b - a:+8.1f}")
    print(f"  {'all ops':56s} {total[0]:8.1f} {total[1]:8.1f}  {total[1] - total[0]:+8.1f}")


if __name__ == "__main__":
    main()
