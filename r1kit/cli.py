"""`r1kit` command line: parse, then call the stage. Each sub-command has --help."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from r1kit import pipeline

    recipe = pipeline.load_recipe(args.recipe or pipeline.DEFAULT_RECIPE, args.set, out_root=args.out)
    pipeline.run(recipe, only=args.only)
    return 0


def _info(args: argparse.Namespace) -> int:
    from r1kit.checkpoint import count_params
    from r1kit.config import PRESETS, ModelConfig, preset

    cfg = preset(args.target) if args.target in PRESETS else ModelConfig.load(args.target)
    total, active = count_params(cfg)
    elems = cfg.kv_cache_elements_per_token() * cfg.num_hidden_layers
    print(json.dumps({
        "model_type": cfg.model_type, "params_total": total, "params_active_per_token": active,
        "kv_cache_elements_per_token": elems, "kv_cache_bytes_per_token_bf16": elems * 2,
        "mtp_modules": cfg.num_nextn_predict_layers,
    }, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from r1kit.checkpoint import export

    dtype = None if args.dtype == "keep" else args.dtype
    result = export(args.src, args.dst, dtype=dtype, chat_template=args.chat_template, mtp=not args.no_mtp)
    if args.check:
        result["check"] = check_with_transformers(args.dst)
    print(json.dumps(result, indent=2))
    return 0


def check_with_transformers(path: str) -> dict:
    """Load an export with transformers (model, tokenizer, chat template) and compare its logits with r1kit's."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--check needs transformers (pip install transformers)") from None
    import torch

    import r1kit.model as M
    from r1kit import tokenizer as T

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ours, tok = M.load(path, dtype=torch.float32).eval(), T.load(path)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text)
    with torch.no_grad():
        x = torch.tensor([ids])
        diff = (hf(x).logits - ours(x)).abs().max().item()
    return {"transformers": transformers.__version__, "max_logit_diff": diff,
            "same_chat_prompt": hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text,
            "same_token_ids": hf_tok(text, add_special_tokens=False)["input_ids"] == ids}


def _generate(args: argparse.Namespace) -> int:
    from r1kit import rewards, testtime
    from r1kit.engine import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.file:
        try:
            prompts += [line.rstrip("\n") for line in open(args.file, encoding="utf-8") if line.strip()]
        except OSError as e:
            print(f"r1kit generate: error: --file {args.file}: {e.strerror}", file=sys.stderr)
            return 2
    if not prompts:
        print("r1kit generate: error: give at least one prompt (argument or --file)", file=sys.stderr)
        return 2
    if args.min_thinking and not args.thinking_budget:
        print("r1kit generate: error: --min-thinking extends reasoning under a budget: give --thinking-budget too",
              file=sys.stderr)
        return 2
    llm = LLM(args.model, speculative=args.speculative, max_num_seqs=max(64, args.n),
              kv_cache_dtype=args.kv_cache_dtype)
    tok = llm.tokenizer
    if tok is None:
        print(f"r1kit generate: error: {args.model} has no tokenizer.json; text prompts need one", file=sys.stderr)
        return 2
    if args.template:
        try:
            tok.set_default_template(args.template)
        except ValueError as e:
            print(f"r1kit generate: error: --template: {e}", file=sys.stderr)
            return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    rendered = [tok.apply_chat_template([*system, {"role": "user", "content": p}], add_generation_prompt=True)
                if args.chat else p for p in prompts]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or None)
    if args.thinking_budget:
        samples = testtime.generate_with_budget(llm, rendered, params, args.thinking_budget,
                                                min_thinking=args.min_thinking, answer_tokens=args.max_tokens)
        texts = [[s.text for s in row] for row in samples]
    else:
        texts = [[o.text for o in r.outputs] for r in llm.generate(rendered, params, use_tqdm=not args.json)]
    prefilled = args.chat and tok.prefills_think
    results = []
    for prompt, row in zip(prompts, texts):
        answers = [testtime.extract_answer(t, prefilled=prefilled) for t in row]
        entry = {"prompt": prompt, "samples": [{"text": t, "answer": a} for t, a in zip(row, answers)]}
        if args.vote:
            entry["majority"], entry["majority_share"] = testtime.majority_vote(answers)
        if args.answer is not None:
            for smp in entry["samples"]:
                smp["correct"] = rewards.check_answer(smp["answer"], args.answer)
            if args.vote:
                entry["majority_correct"] = rewards.check_answer(entry["majority"] or "", args.answer)
        if args.best_of_n:
            best, scores = testtime.best_of_n(row, lambda t: rewards.score(t, args.answer, args.best_of_n,
                                                                           prefilled=prefilled)["reward"])
            entry["best"], entry["best_scores"] = best, scores
        results.append(entry)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for entry in results:
        print(f"\n>>> {entry['prompt']}")
        for i, smp in enumerate(entry["samples"]):
            mark = {1.0: " [correct]", 0.0: " [wrong]"}.get(smp.get("correct"), "")
            print(f"--- sample {i}{mark}\n{smp['text']}")
        if "majority" in entry:
            print(f"=== majority vote: {entry['majority']!r} ({entry['majority_share']:.0%} of samples)")
        if "best" in entry:
            print(f"=== best of {len(entry['samples'])}: sample {entry['best']}")
    if llm.stats.draft_tokens:
        print(f"speculative decoding: {llm.stats.acceptance_rate:.0%} of MTP drafts accepted")
    return 0


# The training stages: each one's flags are its config dataclass's fields (`r1kit grpo --help`), parsed by
# r1kit.train.parse_args after the stage module is imported, so `r1kit info` never pays for it.
STAGES = {
    "pretrain": ("r1kit.pretrain", "PretrainConfig", "pretrain", "pretrain a base model: next-token + MTP loss, packing, "
                 "balancing bias"),
    "sft": ("r1kit.sft", "SFTConfig", "sft", "supervised fine-tuning on conversations (loss on assistant tokens)"),
    "grpo": ("r1kit.grpo", "GRPOConfig", "grpo", "GRPO with verifiable rewards (TRL's option names)"),
    "distill": ("r1kit.distill", "DistillConfig", "distill", "distillation data from a teacher: an OpenAI-compatible "
                "endpoint or a checkpoint; rejection by the task's reward; resumable"),
}


def _stage(name: str, argv: list[str]) -> int:
    import importlib

    from r1kit.checkpoint import CheckpointError
    from r1kit.config import ConfigError

    module_name, config_name, function_name, description = STAGES[name]
    module = importlib.import_module(module_name)
    from r1kit import train

    try:
        cfg = train.parse_args(getattr(module, config_name), argv, prog=f"r1kit {name}", description=description,
                               aliases={"out": "output_dir"})
        result = getattr(module, function_name)(cfg)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"r1kit {name}: error: {e}", file=sys.stderr)
        return 2
    except train.TrainingError as e:
        print(f"r1kit {name}: {e}", file=sys.stderr)
        return 1
    if train.int_env("RANK", 0) == 0:
        print(json.dumps(result))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from r1kit import serve

    return serve.main(args)


def _eval(args: argparse.Namespace) -> int:
    from r1kit import eval as E

    cfg = E.EvalConfig(tasks=args.task or [E.T.DEFAULT], k=args.k, temperature=args.temperature, top_p=args.top_p,
                       max_tokens=args.max_tokens, greedy=not args.no_greedy, limit=args.limit, template=args.template,
                       seed=args.seed, budgets=args.budget or [])
    names = [Path(m).name or m for m in args.models]
    if len(set(names)) < len(names):
        names = list(args.models)
    results = E.evaluate(dict(zip(names, args.models)), cfg, progress=True)
    print(E.markdown_table(results, cfg.k))
    if args.out:
        E.write(results, cfg, args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


KV_CACHE_FLAG = dict(default="auto", choices=["auto", "float32", "float16", "bfloat16"],  # generate and serve
                     help="the K/V cache's element type: 16-bit halves its memory, rounding keys and values as they "
                          "are stored (default: auto, the model's)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STAGES:
        return _stage(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="r1kit", description="The DeepSeek-R1 recipe end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, _, description) in STAGES.items():
        sub.add_parser(name, help=description + f" (r1kit {name} --help)", add_help=False)

    p = sub.add_parser("run", help="run a recipe of stages (default: the tiny R1 recipe), resumable, with a report")
    p.add_argument("recipe", nargs="?", help="a recipe TOML file (default: recipes/tiny.toml)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage setting, e.g. --set base.max_steps=100 (repeatable)")
    p.add_argument("--out", default="runs", help="runs directory (default: runs/); outputs go to OUT/<recipe name>/")
    p.add_argument("--only", action="append", help="run only this stage (and check its inputs are done)")
    p.set_defaults(func=_run)

    p = sub.add_parser("info", help="parameter counts and KV-cache size of a checkpoint or preset")
    p.add_argument("target", help="checkpoint directory, config.json, or a preset (tiny, tiny-dense, deepseek-v3, "
                                  "deepseek-v2-lite)")
    p.set_defaults(func=_info)

    p = sub.add_parser("export", help="write a checkpoint that vLLM, SGLang and transformers load as it is")
    p.add_argument("src", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("dst", help="new directory to write")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--chat-template", help="make this template the default: r1, r1-zero, or one of the "
                                           "tokenizer's own (servers apply the default)")
    p.add_argument("--no-mtp", action="store_true", help="drop the MTP modules")
    p.add_argument("--check", action="store_true", help="load the export with transformers and compare logits")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="sample from a checkpoint: majority vote, best-of-N, thinking budgets")
    p.add_argument("model", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("prompt", nargs="*",
                   help="prompts, each sent as a user message through the chat template (as-is with --raw)")
    p.add_argument("--file", help="a text file with one prompt per line")
    p.add_argument("--raw", dest="chat", action="store_false", help="send prompts as-is, without the chat template")
    p.add_argument("--template", help="chat template: r1, r1-zero, or the tokenizer's own (default; a model trained "
                                      "by r1kit sft/grpo with --chat_template keeps that one)")
    p.add_argument("--system", help="a system message before each prompt (the tiny recipe's: 'Solve it step by step.')")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6, as R1 recommends)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--vote", action="store_true", help="majority vote over the samples' answers (cons@n)")
    p.add_argument("--answer", help="the gold answer: mark each sample and the vote correct or wrong")
    p.add_argument("--best-of-n", metavar="REWARDS", help="pick the sample with the highest reward, e.g. "
                                                          "'accuracy=1,format=0.1' (accuracy needs --answer)")
    p.add_argument("--thinking-budget", type=int, default=0, help="cap the reasoning at this many tokens")
    p.add_argument("--min-thinking", type=int, default=0, help="extend reasoning shorter than this with 'Wait'")
    p.add_argument("--kv-cache-dtype", **KV_CACHE_FLAG)
    p.add_argument("--speculative", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="draft K tokens a step with the model's MTP module, chained (K defaults to 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="serve a checkpoint behind the OpenAI/DeepSeek API, with a chat page at /")
    p.add_argument("model", metavar="DIR", help="checkpoint directory (Hugging Face layout, with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $R1KIT_API_KEY; prefer "
                                     "the variable: a flag shows in the process list)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: DIR's basename)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights, and the cache unless --kv-cache-dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--kv-cache-dtype", **KV_CACHE_FLAG)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences generated at once (default: 64)")
    p.add_argument("--max-model-len", type=int, help="context length in tokens (default: the model's)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond that, requests get 429 (default: 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--price-input-miss", type=float, help="USD per million input tokens on a prefix-cache miss "
                                                           "(default: DeepSeek-R1's 0.55)")
    p.add_argument("--price-input-hit", type=float, help="USD per million input tokens on a cache hit (default: 0.14)")
    p.add_argument("--price-output", type=float, help="USD per million output tokens (default: 2.19)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)

    p = sub.add_parser("eval", help="evaluate checkpoints with the R1 protocol: pass@1 over k samples, cons@k, pass@k")
    p.add_argument("models", nargs="+", help="checkpoint directories (side by side in one table)")
    p.add_argument("--task", action="append", help="task spec, repeatable (default: the tiny recipe's task)")
    p.add_argument("--k", type=int, default=16, help="samples per problem (default: 16)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, help="only the first N problems of each task")
    p.add_argument("--template", help="chat template: r1, r1-zero, or the tokenizer's own (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, action="append", help="thinking budget to sweep (repeatable)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--out", help="write results JSON here (and a markdown table beside it)")
    p.set_defaults(func=_eval)

    args, extra = parser.parse_known_args(argv)
    many = {"generate": "prompt", "eval": "models"}.get(args.command)  # a positional that takes several words
    if extra and many and not any(a.startswith("-") for a in extra):
        # words after the options (`r1kit generate ckpt --raw "a prompt"`): argparse fills such a positional from one
        # run of words only
        setattr(args, many, getattr(args, many) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a.startswith('-') or not many)}")
    from r1kit.checkpoint import CheckpointError
    from r1kit.config import ConfigError
    from r1kit.engine import RequestError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, RequestError, ValueError) as e:
        print(f"r1kit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
