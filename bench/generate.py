"""Decoding speed: r1kit's engine vs transformers `generate` on the same checkpoint, side by side in one run.

The tiny DeepSeek-V3 of shared/BASELINES.md (random weights, fp32, 2 threads), and a dense Qwen2 of similar size:
- decode tokens/s at batch 1 and 16 (prompt 32, 128 new tokens, greedy, EOS ignored), wall time incl. prefill, the
  median of 3 (--quick) or 5 generations, r1kit and transformers taking turns. r1kit: the engine as configured for
  speed (projections packed as for a checkpoint the LLM loads itself; the dense model's step in one C++ call, the
  MLA+MoE model's step compiled), and its eager PyTorch path (the same kernels, no compiled graph, no C++ step);
- decode step time against context length (batch 1): 32 / 256 / 1k / 2k / 4k tokens of prompt, the median of 64
  steps each timed alone (r1kit's engine stepped by hand; transformers' one-token forwards on its cache), measured
  in 3 or 5 rounds (or --rounds) over all the contexts; the medians of the rounds, and the growth from 32 to the
  longest in each;
- KV-cache bytes per token; with --kv-cache-dtype, the step against context with a 16-bit cache as well;
- MTP speculative decoding at batch 1 on a 16-layer MLA+MoE model whose MTP head is trained (a few hundred steps
  on patterned text as long as the generation), with 1, 2 and 3 chained drafts, against plain decoding of the same
  model (both compiled): tokens/s ratio, acceptance rate, and whether the output is identical. Sixteen layers, not
  four: the draft runs one block and the output head, so on a 4-layer model it costs half a step, where
  DeepSeek-V3's MTP block is one of 62.

    .venv/bin/python bench/generate.py [--quick]       # prints a table, writes bench/results/generate.json
    .venv/bin/python bench/generate.py --context-only  # only the step time against context (generate_context.json)
    .venv/bin/python bench/generate.py --context-only --kv-cache-dtype bfloat16  # ... and with a 16-bit cache
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
from r1kit import config as C
from r1kit.engine import LLM, SamplingParams

torch.set_num_threads(2)
PROMPT, NEW = 32, 128


def hf_pair(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(
            vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
            num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
            intermediate_size=512, n_group=1, topk_group=1, max_position_embeddings=8192, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
        hf = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        hf = transformers.Qwen2ForCausalLM(cfg)
    hf.eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = M.load(d).eval()
    return hf, ours


def time_hf(hf, batch: int, prompt_len: int, new: int) -> float:
    x = torch.randint(3, 4096, (batch, prompt_len))
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0


def time_ours(llm: LLM, batch: int, prompt_len: int, new: int) -> float:
    x = torch.randint(3, 4096, (batch, prompt_len)).tolist()  # fresh prompts: no prefix-cache hits
    t0 = time.perf_counter()
    llm.generate(x, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    return time.perf_counter() - t0


def time_side_by_side(hf, llms: dict[str, LLM], batch: int, reps: int) -> dict[str, list[float]]:
    """Seconds for `reps` generations each, the runners taking turns within every rep: this shared machine's speed
    drifts by up to 2x over minutes, and turns keep a slow spell from landing on one side only."""
    time_hf(hf, batch, PROMPT, 4)  # warm-up: allocations, the compiled step at this batch
    for llm in llms.values():
        time_ours(llm, batch, PROMPT, 4)
    times: dict[str, list[float]] = {"transformers": [], **{name: [] for name in llms}}
    for _ in range(reps):
        times["transformers"].append(time_hf(hf, batch, PROMPT, NEW))
        for name, llm in llms.items():
            times[name].append(time_ours(llm, batch, PROMPT, NEW))
    return times


def warm_up(llm: LLM, longest: int) -> None:
    """Compile the decode step once for batch 1 and once for every larger batch, and, since contexts past 4,096 keys
    are one more graph (a range guard on the symbolic length), at the longest context too."""
    for b in (1, 2):
        llm.generate(torch.randint(3, 4096, (b, 8)).tolist(),
                     SamplingParams(temperature=0, max_tokens=70, ignore_eos=True))
    llm.generate(torch.randint(3, 4096, (1, longest)).tolist(),
                 SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))


def step_ms_ours(llm: LLM, ctx: int, steps: int = 64) -> float:
    """Median time of one decode step (batch 1) at context `ctx`: the engine stepped by hand, each step timed
    alone, so the prefill's noise never enters."""
    eng = llm.engine
    eng.add_request(torch.randint(3, 4096, (ctx,)).tolist(), SamplingParams(temperature=0, max_tokens=steps + 1,
                                                                              ignore_eos=True))
    eng.step()  # admission: the prefill and the first token
    ts = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        eng.step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def step_ms_hf(hf, ctx: int, steps: int = 64) -> float:
    """The same for transformers: its prefill, then one-token forwards on its cache, as `generate` runs them."""
    x = torch.randint(3, 4096, (1, ctx))
    ts = []
    with torch.inference_mode():
        out = hf(input_ids=x, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pkv = out.past_key_values
        for _ in range(steps):
            t0 = time.perf_counter()
            out = hf(input_ids=tok, past_key_values=pkv, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            pkv = out.past_key_values
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def decode_table(kind: str, reps: int, contexts: list[int], throughput: bool = True,
                 kv_cache_dtype: str | None = None) -> dict:
    """Tokens/s at batch 1 and 16 (`throughput`) and the step time against context, r1kit against transformers;
    with `kv_cache_dtype`, the step times of an r1kit engine with that cache too (its own column)."""
    hf, ours = hf_pair(kind)
    # packed projections, as an LLM loading this checkpoint from its directory does by itself (`pack_weights`)
    eager = LLM(ours, max_num_seqs=16, max_model_len=max(contexts) + NEW + 8, pack_weights=True)
    eager.engine._dense_step = None  # the engine's PyTorch path, step by step, for comparison
    cache_dtypes = {"r1kit": None}  # engine name -> its cache's dtype (None: the model's)
    if kv_cache_dtype:
        cache_dtypes[f"r1kit_{kv_cache_dtype}_kv"] = kv_cache_dtype
    engines = {name: LLM(ours, max_num_seqs=16, max_model_len=max(contexts) + NEW + 8, compile=True, pack_weights=True,
                         kv_cache_dtype=kv) for name, kv in cache_dtypes.items()}
    llm = engines["r1kit"]
    t0 = time.perf_counter()
    for e in engines.values():
        warm_up(e, max(contexts))
    res = {"kv_cache_bytes_per_token": {name: e.engine.cache.bytes_per_token for name, e in engines.items()},
           "compile_warmup_s": time.perf_counter() - t0}
    cfg = ours.config
    if cfg.is_mla:  # transformers caches the latent too, but expands it through kv_b_proj every step
        res["kv_cache_bytes_per_token"]["transformers"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    else:
        res["kv_cache_bytes_per_token"]["transformers"] = llm.engine.cache.bytes_per_token
    for batch in (1, 16) if throughput else ():
        t = time_side_by_side(hf, {"compiled": llm, "eager": eager}, batch, reps)
        th, to, te = (statistics.median(t[k]) for k in ("transformers", "compiled", "eager"))
        res[f"batch{batch}"] = {"transformers_tokens_per_s": batch * NEW / th, "r1kit_tokens_per_s": batch * NEW / to,
                                "speedup": th / to, "r1kit_eager_tokens_per_s": batch * NEW / te,
                                "eager_speedup": th / te,  # medians; and each rep's ratio, for the spread:
                                "speedup_per_rep": [h / o for h, o in zip(t["transformers"], t["compiled"])]}
        print(kind, f"batch {batch}", json.dumps(res[f"batch{batch}"]), flush=True)
    for ctx in contexts:
        for e in engines.values():
            step_ms_ours(e, ctx)  # compile warm-up at this context (a context past 4,096 keys is its own graph)
    # rounds over all the contexts, so that a slow minute of this shared machine lands on one round, not one context
    rounds = {ctx: {"transformers": [], **{name: [] for name in engines}} for ctx in contexts}
    for r in range(reps):
        for ctx in contexts:
            rounds[ctx]["transformers"].append(step_ms_hf(hf, ctx))
            for name, e in engines.items():
                rounds[ctx][name].append(step_ms_ours(e, ctx))
        print(kind, f"step ms by context, round {r + 1}:",
              json.dumps({c: {k: round(v[-1], 3) for k, v in rounds[c].items()} for c in contexts}), flush=True)
    res["step_ms_vs_context"] = {c: {k: statistics.median(v) for k, v in rounds[c].items()} for c in contexts}
    first, last = contexts[0], contexts[-1]
    for name in ("transformers", *engines):
        res[f"{name}_growth_{first}_to_{last}"] = (res["step_ms_vs_context"][last][name]
                                                   / res["step_ms_vs_context"][first][name])
        res[f"{name}_growth_per_round"] = [b / a for a, b in zip(rounds[first][name], rounds[last][name])]
    return res


def trained_mtp_model(steps: int, layers: int = 16) -> M.Transformer:
    """A small MLA+MoE+MTP model trained on patterned sequences, so its MTP head has something to predict."""
    torch.manual_seed(0)
    cfg = C.tiny(vocab_size=4096, max_position_embeddings=1024, num_nextn_predict_layers=1, num_hidden_layers=layers)
    model = M.build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(B=8, T=160):  # counting modulo 251 from a random start by a stride of 1, 2 or 3: the next tokens
        start = torch.randint(0, 251, (B, 1))  # follow from the last two, so both heads must attend to learn them
        stride = torch.randint(1, 4, (B, 1))
        return (start + stride * torch.arange(T)) % 251 + 3

    model.train()
    for _ in range(steps):
        x = batch()
        h = model(x, head=False)
        tgt = F.pad(x[:, 1:], (0, 1), value=-100)
        loss = M.linear_cross_entropy(h, model.lm_head.weight, tgt)
        mtp = model.mtp_forward(h, x)[0]
        loss = loss + 0.5 * F.cross_entropy(mtp.flatten(0, 1), F.pad(x[:, 2:], (0, 1), value=-100).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        M.update_balancing_bias(model)
    model.eval()
    model.bench_batch = batch
    return model


def speculation(reps: int, steps: int, layers: int = 16, drafts=(1, 2, 3)) -> dict:
    """Plain decoding against speculative decoding with 1..3 chained MTP drafts, compiled (and eager, for the
    largest k), timed in interleaved rounds: this shared machine's speed drifts more between minutes than these
    ratios differ."""
    model = trained_mtp_model(steps, layers)
    prompts = model.bench_batch(B=1, T=32).tolist()
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    runs = [("compiled", k) for k in (0, *drafts)] + [("eager", 0), ("eager", max(drafts))]
    llms = {r: LLM(model, max_num_seqs=1, speculative=r[1], compile=r[0] == "compiled") for r in runs}
    times, tokens = {r: [] for r in runs}, {}
    for llm in llms.values():
        llm.engine.enable_prefix_caching = False
        for _ in range(2):  # compile: prefill, decode / verify and MTP graphs
            llm.generate(prompts, params)
        llm.engine.stats = type(llm.engine.stats)()
    for _ in range(2 * reps + 1):
        for r, llm in llms.items():
            t0 = time.perf_counter()
            tokens[r] = llm.generate(prompts, params)[0].outputs[0].token_ids
            times[r].append(time.perf_counter() - t0)
    tps = {r: NEW / statistics.median(ts) for r, ts in times.items()}
    res = {"layers": layers, "train_steps": steps, "plain_tokens_per_s": tps[("compiled", 0)],
           "plain_eager_tokens_per_s": tps[("eager", 0)]}
    for mode, k in runs:
        if k:
            base = ("compiled" if mode == "compiled" else "eager", 0)
            key = f"drafts_{k}" + ("_eager" if mode == "eager" else "")
            res[key] = {"tokens_per_s": tps[(mode, k)], "speedup": tps[(mode, k)] / tps[base],
                        "acceptance_rate": llms[(mode, k)].stats.acceptance_rate,
                        "identical_output": tokens[(mode, k)] == tokens[("compiled", 0)]}
            print("speculation", key, json.dumps(res[key]), flush=True)
    best = max(drafts, key=lambda k: res[f"drafts_{k}"]["speedup"])
    res["best_drafts"], res["speedup"] = best, res[f"drafts_{best}"]["speedup"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 reps, contexts 32 and 1k only, shorter speculation")
    ap.add_argument("--context-only", action="store_true", help="only the step time against context length")
    ap.add_argument("--kv-cache-dtype", choices=["float16", "bfloat16"],
                    help="also time the steps against context with a 16-bit cache (its own column)")
    ap.add_argument("--rounds", type=int, help="generations per throughput measure and rounds over the contexts "
                    "(default 5; 3 with --quick)")
    args = ap.parse_args()
    reps = args.rounds or (3 if args.quick else 5)
    contexts = [32, 256, 1024, 2048, 4000] if not args.quick else [32, 1024]
    import transformers

    res = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": 2}
    throughput = not args.context_only
    res["deepseek_v3"] = decode_table("deepseek_v3", reps, contexts, throughput, args.kv_cache_dtype)
    res["qwen2"] = decode_table("qwen2", reps, [32, 1024] if args.quick else [32, 1024, 4000], throughput,
                                args.kv_cache_dtype)
    if throughput:
        res["speculation"] = speculation(reps, 200 if args.quick else 300)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / ("generate_context.json" if args.context_only else "generate.json")).write_text(json.dumps(res, indent=1) + "\n")
    print()
    for kind in ("deepseek_v3", "qwen2"):
        r = res[kind]
        for b in (1, 16) if throughput else ():
            x = r[f"batch{b}"]
            print(f"{kind:12s} batch {b:2d}  transformers {x['transformers_tokens_per_s']:7.0f} tok/s   "
                  f"r1kit {x['r1kit_tokens_per_s']:7.0f} tok/s   {x['speedup']:.2f}x   "
                  f"(eager {x['r1kit_eager_tokens_per_s']:.0f} tok/s, {x['eager_speedup']:.2f}x)")
        print(f"{kind:12s} compile warm-up {r['compile_warmup_s']:.0f} s")
        ctx = list(r["step_ms_vs_context"])
        row = "  ".join(f"{c}: {r['step_ms_vs_context'][c]['transformers']:.1f}/{r['step_ms_vs_context'][c]['r1kit']:.1f}"
                        for c in ctx)
        print(f"{kind:12s} step ms by context (transformers/r1kit, medians of {reps} rounds)  {row}")
        g = [k for k in r if k.startswith("r1kit_growth_") and k != "r1kit_growth_per_round"][0]
        print(f"{kind:12s} step growth {g[len('r1kit_growth_'):].replace('_to_', ' -> ')}: r1kit {r[g]:.2f}x "
              f"(per round {', '.join(f'{x:.2f}' for x in r['r1kit_growth_per_round'])}), "
              f"transformers {r[g.replace('r1kit', 'transformers')]:.2f}x")
        for name in [n for n in r["kv_cache_bytes_per_token"] if n.endswith("_kv")]:
            row = "  ".join(f"{c}: {r['step_ms_vs_context'][c][name]:.2f}" for c in ctx)
            growth = r[g.replace("r1kit", name)]
            print(f"{kind:12s} {name}: step ms {row}; growth {growth:.2f}x "
                  f"(per round {', '.join(f'{x:.2f}' for x in r[name + '_growth_per_round'])})")
        print(f"{kind:12s} KV bytes/token  {r['kv_cache_bytes_per_token']}")
    s = res.get("speculation", {})
    for key in [k for k in s if k.startswith("drafts_")]:
        x = s[key]
        print(f"MTP speculation batch 1, {key}: {x['speedup']:.2f}x tokens/s against plain decoding in the same mode, "
              f"acceptance {x['acceptance_rate']:.0%}, identical output: {x['identical_output']}")


if __name__ == "__main__":
    main()
