"""Evaluation with the R1 paper's protocol (§3, "Evaluation Setup").

For each problem, k samples at temperature 0.6 and top-p 0.95:
- pass@1 = the fraction of correct samples, averaged over problems (more stable than one greedy answer);
- cons@k = the majority vote over the k samples' extracted answers is correct;
- pass@m for m <= k with the unbiased estimator 1 - C(n-c, m) / C(n, m) (Chen et al. 2021, eq. 1);
- greedy accuracy (temperature 0), and the mean response length in tokens;
- the share of problems whose k samples are all right, all wrong or mixed (a vote can only gain on the mixed);
- the thinking rate (samples whose reasoning is not empty) and the accuracy of thinking and of direct samples:
  RL amplifies whichever earns more, so a base whose thoughts are worse than its direct answers will not learn
  to think.
Standard errors are over problems. Test-time scaling: cons@m and pass@m for m = 1, 2, 4, ... k from the same
samples, and accuracy against a thinking budget (see `r1kit.testtime`).

    r1kit eval runs/x/r1 runs/x/base --task "addition?digits=3&size=500" --k 16 --out results.json
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1kit import tasks as T
from r1kit.engine import LLM, SamplingParams
from r1kit.rewards import check_answer
from r1kit.tokenizer import ANSWER, END_THINK, split_reasoning
from r1kit.testtime import extract_answer, generate_with_budget, majority_vote


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: [T.DEFAULT])
    k: int = 16  # samples per problem for pass@1, cons@k and pass@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    greedy: bool = True  # also score one greedy answer per problem
    limit: int | None = None  # evaluate the first `limit` problems of each task
    template: str | None = None  # a chat template name ("r1", "r1-zero") or None for the tokenizer's own
    seed: int = 0
    budgets: list[int] = field(default_factory=list)  # thinking budgets to sweep (tokens)
    max_num_seqs: int = 64
    compile: bool = False  # torch.compile the engine's decode step

    def __post_init__(self):
        for name, lo in (("k", 1), ("max_tokens", 1), ("max_num_seqs", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < lo:
                raise ValueError(f"eval: {name}={getattr(self, name)!r}: must be an integer >= {lo}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"eval: temperature={self.temperature!r}: must be in [0, 100]")
        if not self.tasks:
            raise ValueError("eval: tasks: give at least one task spec")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def render(tok, example: T.Example, template: str | None) -> str:
    return tok.apply_chat_template(example.chat(), add_generation_prompt=True, chat_template=template)


def evaluate_task(llm: LLM, task: T.Task, cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Score one model on one task. Returns the metrics (fractions in [0, 1]) and the scaling curves."""
    tok = llm.tokenizer
    examples = task.examples[: cfg.limit] if cfg.limit else list(task.examples)
    if not examples:
        raise ValueError(f"eval: task {task.name!r} has no problems")
    prompts = [render(tok, e, cfg.template) for e in examples]
    prefilled = render(tok, T.Example("x", ""), cfg.template).rstrip().endswith("<think>")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"task": task.name, "problems": len(examples), "k": cfg.k}
    generated = 0  # tokens sampled, every pass included (the stage's cost)
    if cfg.greedy:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=cfg.max_tokens), use_tqdm=progress)
        generated += sum(len(o.outputs[0].token_ids) for o in outs)
        right = [check_answer(extract_answer(o.outputs[0].text, prefilled), e) for o, e in zip(outs, examples)]
        result["greedy"] = sum(right) / len(right)
        result["greedy_se"] = _se(right)
    params = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=cfg.seed).per_prompt(len(prompts))
    outs = llm.generate(prompts, params, use_tqdm=progress)
    per_problem, lengths, scaling = [], [], {}
    split = {"all_right": 0, "all_wrong": 0, "mixed": 0}  # a majority vote can only gain on the mixed problems
    by_mode: dict[bool, list[float]] = {True: [], False: []}  # accuracy of samples that thought / answered directly
    ms = sorted({2**i for i in range(cfg.k.bit_length()) if 2**i <= cfg.k} | {cfg.k})  # 1, 2, 4, ..., k
    cons_m = {m: [] for m in ms}
    pass_m = {m: [] for m in ms}
    for out, ex in zip(outs, examples):
        answers = [extract_answer(o.text, prefilled) for o in out.outputs]
        correct = [check_answer(a, ex) for a in answers]
        c = sum(1 for x in correct if x >= 1.0)
        split["all_right" if c == len(correct) else "all_wrong" if not any(correct) else "mixed"] += 1
        for o, x in zip(out.outputs, correct):
            by_mode[bool(split_reasoning(o.text, prefilled)[0].strip())].append(x)
        per_problem.append(sum(correct) / len(correct))
        lengths.extend(len(o.token_ids) for o in out.outputs)
        for m in ms:
            winner, _ = majority_vote(answers[:m])
            cons_m[m].append(check_answer(winner, ex) if winner is not None else 0.0)
            pass_m[m].append(pass_at_k(len(correct), c, m))
    votes = cons_m[cfg.k]
    result["pass@1"] = sum(per_problem) / len(per_problem)
    result["pass@1_se"] = _se(per_problem)
    result[f"cons@{cfg.k}"] = sum(votes) / len(votes)
    result[f"cons@{cfg.k}_se"] = _se(votes)
    result[f"pass@{cfg.k}"] = sum(pass_m[cfg.k]) / len(examples)
    result["mean_response_tokens"] = sum(lengths) / len(lengths)
    for key, n in split.items():  # where cons@k can differ from pass@1: the samples of a problem that disagree
        result[f"problems_{key}"] = n / len(examples)
    # Whether the model chose to think, and what it was worth: RL amplifies whichever mode earns more reward.
    result["thinking_rate"] = len(by_mode[True]) / (len(by_mode[True]) + len(by_mode[False]))
    for key, mode in (("accuracy_thinking", True), ("accuracy_direct", False)):
        result[key] = sum(by_mode[mode]) / len(by_mode[mode]) if by_mode[mode] else None
    scaling["samples"] = [{"m": m, "cons": sum(cons_m[m]) / len(examples), "pass": sum(pass_m[m]) / len(examples)}
                          for m in ms]
    if cfg.budgets:
        curve = []
        # the reasoning is closed the way the template's own answers follow it
        close = f" {END_THINK} {ANSWER}" if cfg.template == "r1-zero" else f"\n{END_THINK}\n\n"
        for b in cfg.budgets:
            rows = generate_with_budget(llm, prompts, SamplingParams(n=1, temperature=cfg.temperature,
                                                                     top_p=cfg.top_p, seed=cfg.seed), b,
                                        answer_tokens=32, close=close)
            acc = [check_answer(extract_answer(r[0].text, prefilled), e) for r, e in zip(rows, examples)]
            generated += sum(r[0].reasoning_tokens + r[0].answer_tokens for r in rows)
            curve.append({"budget": b, "accuracy": sum(acc) / len(acc),
                          "mean_reasoning_tokens": sum(r[0].reasoning_tokens for r in rows) / len(rows)})
        scaling["budget"] = curve
    result["scaling"] = scaling
    result["generated_tokens"] = generated + sum(lengths)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def evaluate(models: dict[str, Any], cfg: EvalConfig, progress: bool = False) -> dict[str, dict[str, dict]]:
    """{model name: {task: metrics}} for checkpoint directories or LLM objects, side by side."""
    loaded = [(spec, T.load(spec)) for spec in cfg.tasks]
    results: dict[str, dict[str, dict]] = {}
    for name, model in models.items():
        llm = model if isinstance(model, LLM) else LLM(model, max_num_seqs=cfg.max_num_seqs, compile=cfg.compile)
        if llm.tokenizer is None:
            raise ValueError(f"eval: {name}: the checkpoint has no tokenizer.json")
        results[name] = {spec: evaluate_task(llm, task, cfg, progress) for spec, task in loaded}
    return results


def markdown_table(results: dict[str, dict[str, dict]], k: int) -> str:
    rows = ["| model | task | problems | greedy | pass@1 | cons@%d | pass@%d | mean tokens | thinks | "
            "acc. thinking / direct |" % (k, k),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name, per_task in results.items():
        for task, r in per_task.items():
            g = f"{r['greedy']:.3f}" if "greedy" in r else "—"
            rows.append(f"| {name} | {task} | {r['problems']} | {g} | {r['pass@1']:.3f} ± {r['pass@1_se']:.3f} | "
                        f"{r[f'cons@{k}']:.3f} | {r[f'pass@{k}']:.3f} | {r['mean_response_tokens']:.1f} | "
                        f"{r.get('thinking_rate', 0):.0%} | {pct(r.get('accuracy_thinking'))} / "
                        f"{pct(r.get('accuracy_direct'))} |")
    return "\n".join(rows)


def write(results: dict, cfg: EvalConfig, out: str | Path) -> None:
    """results.json (with the config) and results.md beside it, each written to a temporary name first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps({"config": asdict(cfg), "results": results}, indent=2)),
                       (out.with_suffix(".md"), markdown_table(results, cfg.k) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
