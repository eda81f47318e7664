"""Serving throughput and latency: `r1kit serve` vs `transformers serve`, same checkpoint, same requests.

Each server runs in its own process on a loopback port; clients in this process stream chat completions
(`stream_options.include_usage`) at 1, 4, 16 and 64 concurrent streams. Per level: aggregate output tokens/s
(all completion tokens / wall time), p50 / p99 time to first token (TTFT) and inter-token latency (ITL, the gaps
between streamed chunks), and the aggregate's ratio to 1 stream (continuous batching's goal: >= 4x at 16).

The model is the tiny DeepSeek-V3 of shared/BASELINES.md (MLA + 16 experts, ~8M parameters) with random weights
and a small BPE tokenizer, unless --model names a checkpoint. Requests do not ask for ignore_eos (the peer has
none), so a completion may end early at EOS; throughput counts the tokens actually generated.

    .venv/bin/python bench/serve.py [--quick] [--model DIR] [--no-peer] [--threads N]
    # prints a table and writes bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1kit.serve import spawn, spawn_command, tiny_checkpoint  # noqa: E402

LEVELS = (1, 4, 16, 64)
REQUESTS_PER_CLIENT = {1: 8, 4: 4, 16: 2, 64: 2}
# the tiny DeepSeek-V3 preset (r1kit.config.tiny), with the tokenizer's vocabulary
PRESET = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, moe_intermediate_size=128,
              intermediate_size=512, max_position_embeddings=2048)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    """(start time, arrival time of each streamed text chunk, completion tokens) of one streamed chat request."""
    start, arrivals, usage = time.perf_counter(), [], None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    arrivals.append(time.perf_counter())
    return start, arrivals, usage["completion_tokens"] if usage else len(arrivals)


async def level(url: str, model: str, streams: int, per_client: int, max_tokens: int) -> dict:
    async def client(i: int):
        out = []
        for j in range(per_client):
            body = {"model": model, "messages": [{"role": "user", "content": f"What is {i} plus {j}?"}],
                    "max_tokens": max_tokens, "temperature": 0.6, "seed": 1000 * i + j, "stream": True,
                    "stream_options": {"include_usage": True}}
            out.append(await one_request(http, url, body))
        return out

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        t0 = time.perf_counter()
        runs = [r for rs in await asyncio.gather(*(client(i) for i in range(streams))) for r in rs]
        wall_s = time.perf_counter() - t0
    ttft = [a[0] - s for s, a, _ in runs if a]
    itl = [b - a for _, arr, _ in runs for a, b in zip(arr, arr[1:])]
    tokens = sum(n for _, _, n in runs)
    return {"streams": streams, "requests": len(runs), "tokens": tokens, "wall_s": round(wall_s, 3),
            "tokens_per_s": round(tokens / wall_s, 1),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
            "itl_p50_ms": round(1e3 * percentile(itl, 50), 2), "itl_p99_ms": round(1e3 * percentile(itl, 99), 2)}


def start_transformers(model_dir: Path, env: dict, batching: bool) -> tuple[subprocess.Popen, str]:
    """`transformers serve DIR` offline (HF_HUB_OFFLINE=1), on CPU, with or without its continuous batching."""
    exe = Path(sys.executable).with_name("transformers")
    return spawn_command(lambda port: [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                       "--device", "cpu",
                                       "--continuous-batching" if batching else "--no-continuous-batching"],
                         "transformers serve", {**env, "HF_HUB_OFFLINE": "1"}, timeout_s=120)


def run(name: str, proc: subprocess.Popen, url: str, model: str, args) -> dict:
    try:
        asyncio.run(level(url, model, 2, 1, 8))  # warm-up
        rows = []
        for streams in LEVELS:
            per_client = max(1, REQUESTS_PER_CLIENT[streams] // (2 if args.quick else 1))
            row = asyncio.run(level(url, model, streams, per_client, args.max_tokens))
            rows.append(row)
            print(f"{name:>13} {streams:>3} streams: {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f}"
                  f" p99 {row['ttft_p99_ms']:7.1f} ms  ITL p50 {row['itl_p50_ms']:6.2f} p99 {row['itl_p99_ms']:7.2f} ms",
                  flush=True)
        base = rows[0]["tokens_per_s"]
        for row in rows:
            row["speedup_vs_1"] = round(row["tokens_per_s"] / base, 2)
        return {"levels": rows}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random tiny DeepSeek-V3)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="half the requests")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="r1kit only")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both servers (default: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_checkpoint(Path(tmp) / "tiny-deepseek-v3", **PRESET)
        results = {"model": str(args.model or "random tiny DeepSeek-V3 (r1kit.config.tiny dims)"),
                   "max_tokens": args.max_tokens, "threads": args.threads, "cpu_count": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(), "servers": {}}
        proc, url = spawn(model_dir, "--max-num-seqs", "64", "--max-model-len", "1024", "--max-queue", "256",
                          "--served-model-name", "bench", env=env)
        results["servers"]["r1kit"] = run("r1kit", proc, url, "bench", args)
        for batching in (True, False) if args.peer else ():  # its continuous batching first, else without
            mode = "continuous batching" if batching else "no continuous batching"
            try:
                proc, url = start_transformers(model_dir, env, batching)
                results["servers"]["transformers"] = {"mode": mode, **run("transformers", proc, url, str(model_dir),
                                                                          args)}
                break
            except Exception as e:  # noqa: BLE001 - report why the peer did not run, keep r1kit's numbers
                print(f"transformers serve ({mode}) failed: {e}", file=sys.stderr)
                results.setdefault("peer_errors", {})[mode] = str(e)[:2000]
    peer = results["servers"].get("transformers", {}).get("levels")
    if peer:
        for ours, theirs in zip(results["servers"]["r1kit"]["levels"], peer):
            ours["tokens_per_s_vs_transformers"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'streams':>8} {'r1kit tok/s':>12} {'x vs 1':>7} {'peer tok/s':>11} {'r1kit/peer':>10}")
    for i, row in enumerate(results["servers"]["r1kit"]["levels"]):
        p = peer[i]["tokens_per_s"] if peer else float("nan")
        print(f"{row['streams']:>8} {row['tokens_per_s']:>12.1f} {row['speedup_vs_1']:>7.2f} {p:>11.1f} "
              f"{row.get('tokens_per_s_vs_transformers', float('nan')):>10.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
