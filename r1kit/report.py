"""The run report: `report.md`, `results.json` and PNG plots under `runs/<name>/`.

`results.json` is for machines as well as people:
    {"wall_clock_s": ..., "models": {NAME: {"greedy", "pass@1", "cons@16", "mean_response_tokens", "thinking_rate",
                                           "accuracy_thinking", "accuracy_direct", ...}},
     "r1_zero_curve": [{"step", "reward", "accuracy", "mean_response_tokens"}, ...], "targets": {...}, ...}
with accuracies as fractions in [0, 1]. The report states plainly which of the recipe's targets were met.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

# What the tiny recipe must show (issue #6): (name, description, check on the results)
TARGETS = [
    ("r1_zero_gain", "R1-Zero raises pass@1 by >= 20 points over the base",
     lambda m, c: _get(m, "r1_zero", "pass@1") - _get(m, "base", "pass@1") >= 0.20),
    ("length_trend", "mean response length trends up during R1-Zero RL",
     lambda m, c: _trend(c) > 0),
    ("cons_beats_pass", "cons@16 beats pass@1 by >= 5 points (R1-Zero model)",
     lambda m, c: _get(m, "r1_zero", "cons@16") - _get(m, "r1_zero", "pass@1") >= 0.05),
    ("distill_beats_rl", "the distilled student beats the RL-only student by >= 10 points (pass@1)",
     lambda m, c: _get(m, "student_distilled", "pass@1") - _get(m, "student_rl", "pass@1") >= 0.10),
]


def _get(models: dict, name: str, key: str) -> float:
    v = models.get(name, {}).get(key)
    return float("nan") if v is None else float(v)


def _trend(curve: list[dict]) -> float:
    """Least-squares slope of mean response length against step (tokens per step)."""
    pts = [(p["step"], p["mean_response_tokens"]) for p in curve if p.get("mean_response_tokens") is not None]
    if len(pts) < 2:
        return float("nan")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else float("nan")


def stage_work(record: dict) -> dict[str, float | None]:
    """Tokens a stage trained on (forward + backward) and sampled, and its FLOPs: 6 per active weight per trained
    token, 2 per sampled token (prompt prefill and attention over the context left out: short sequences here).
    Training stages are counted from their metrics.jsonl, sampling stages report their own; None when unknown."""
    if "generated_tokens" in record:  # rejection, eval
        return {"trained_tokens": 0, "generated_tokens": record["generated_tokens"], "flops": record.get("flops")}
    model = record.get("model")
    out = record.get("output_dir")
    if not model or not out:
        return {"trained_tokens": None, "generated_tokens": None, "flops": None}
    rows = read_metrics(Path(out) / "metrics.jsonl")
    if not rows or "tokens" not in rows[-1]:
        return {"trained_tokens": None, "generated_tokens": None, "flops": None}
    trained = sum(r.get("tokens", 0) for r in rows)
    rollouts = {r["rollout_position"]: r.get("generated_tokens", 0) for r in rows if "rollout_position" in r}
    generated = sum(rollouts.values())  # the optimizer steps of one rollout share its samples
    from r1kit.pipeline import _active_params

    n = _active_params(model)
    flops = None if n is None else 6 * n * trained + 2 * n * generated
    return {"trained_tokens": trained, "generated_tokens": generated, "flops": flops}


def _scaling_tables(scaling: dict[str, dict]) -> list[str]:
    """Markdown: majority-vote accuracy against the number of samples, and accuracy against the thinking budget."""
    lines = []
    ms = sorted({p["m"] for s in scaling.values() for p in s.get("samples", [])})
    if ms:
        lines += ["", "## Test-time scaling", "", "Majority vote over m samples (cons@m; `test_time_scaling.png`):", "",
                  "| model | " + " | ".join(f"m = {m}" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
        for name, s in scaling.items():
            cons = {p["m"]: p["cons"] for p in s.get("samples", [])}
            lines.append(f"| {name} | " + " | ".join(f"{cons[m]:.3f}" if m in cons else "—" for m in ms) + " |")
    budgets = sorted({p["budget"] for s in scaling.values() for p in s.get("budget", [])})
    if budgets:
        lines += ["", "Accuracy of one sample when the reasoning is capped at B tokens, then closed and answered "
                  "(`thinking_budget.png`):", "",
                  "| model | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for name, s in scaling.items():
            acc = {p["budget"]: p["accuracy"] for p in s.get("budget", [])}
            lines.append(f"| {name} | " + " | ".join(f"{acc[b]:.3f}" if b in acc else "—" for b in budgets) + " |")
    return lines


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def rl_curve(stage_dir: Path) -> list[dict]:
    return [{"step": r.get("step"), "reward": r.get("reward"), "accuracy": r.get("accuracy"),
             "mean_response_tokens": r.get("completion_length")} for r in read_metrics(stage_dir / "metrics.jsonl")
            if "reward" in r]


def _plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="o" if len(pts) < 12 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _smooth(pts: list[tuple[float, float]], w: int = 5) -> list[tuple[float, float]]:
    ys = [y for _, y in pts]
    return [(x, sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1])) for i, (x, _) in enumerate(pts)]


def write(recipe, outputs: dict[str, dict], out_dir: Path, console=None) -> dict[str, Any]:
    """Gather every stage's outputs into report.md, results.json and plots."""
    price = float(recipe.report.get("price_per_hour", 0.10))
    eval_stage = next((s.name for s in recipe.stages if s.kind == "eval" and s.name in outputs), None)
    models: dict[str, dict] = {}
    scaling: dict[str, dict] = {}
    if eval_stage:
        res = json.loads(Path(outputs[eval_stage]["results"]).read_text())
        k = res["config"]["k"]
        for name, per_task in res["results"].items():
            r = next(iter(per_task.values()))  # the first task is the headline
            models[name] = {"greedy": r.get("greedy"), "pass@1": r["pass@1"], f"cons@{k}": r[f"cons@{k}"],
                            f"pass@{k}": r[f"pass@{k}"], "mean_response_tokens": r["mean_response_tokens"],
                            "pass@1_se": r["pass@1_se"], "problems": r["problems"],
                            **{key: r.get(key) for key in ("thinking_rate", "accuracy_thinking", "accuracy_direct",
                                                           "problems_all_right", "problems_all_wrong",
                                                           "problems_mixed")}}
            scaling[name] = r.get("scaling", {})
    grpo_stages = [s.name for s in recipe.stages if s.kind == "grpo" and s.name in outputs]
    curves = {name: rl_curve(out_dir / name) for name in grpo_stages}
    zero_stage = recipe.report.get("r1_zero_stage", "r1_zero")
    r1_zero_curve = curves.get(zero_stage, [])
    targets = {}
    for key, text, check in TARGETS:
        try:
            ok = bool(check(models, r1_zero_curve))
        except Exception:  # noqa: BLE001 - a missing model means the target was not shown
            ok = False
        targets[key] = {"target": text, "met": ok}
    zero = models.get("r1_zero", {})
    if zero.get("problems_mixed") is not None:  # why a vote does or does not gain
        targets["cons_beats_pass"]["detail"] = (
            f"R1-Zero's samples: all right on {zero['problems_all_right']:.0%} of problems, all wrong on "
            f"{zero['problems_all_wrong']:.0%}, mixed on {zero['problems_mixed']:.0%}; a vote can only gain on "
            f"the mixed ones")
    wall = sum(o.get("elapsed_s", 0) for o in outputs.values())
    stages = [{"stage": s.name, "kind": s.kind, "elapsed_s": outputs[s.name].get("elapsed_s", 0),
               "cost_usd": outputs[s.name].get("elapsed_s", 0) / 3600 * price, **stage_work(outputs[s.name])}
              for s in recipe.stages if s.name in outputs]
    results = {"wall_clock_s": wall, "models": models, "r1_zero_curve": r1_zero_curve, "targets": targets,
               "stages": stages, "scaling": scaling,
               "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads(), "python": platform.python_version(),
                            "torch": torch.__version__}}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_dir / "results.json")

    # plots
    for name, curve in curves.items():
        for key, label in (("reward", "reward"), ("accuracy", "accuracy (train samples)"),
                           ("mean_response_tokens", "mean response tokens")):
            pts = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
            if pts:
                _plot(out_dir / f"{name}_{key}.png", f"{name}: {label}", {"per step": pts, "smoothed": _smooth(pts)},
                      "RL step", label)
    if scaling:
        _plot(out_dir / "test_time_scaling.png", "majority vote over m samples (cons@m)",
              {n: [(p["m"], p["cons"]) for p in s.get("samples", [])] for n, s in scaling.items()},
              "samples m", "accuracy")
        budgets = {n: [(p["budget"], p["accuracy"]) for p in s.get("budget", [])] for n, s in scaling.items()
                   if s.get("budget")}
        if budgets:
            _plot(out_dir / "thinking_budget.png", "accuracy against the thinking budget", budgets,
                  "reasoning tokens allowed", "accuracy")

    # markdown
    lines = [f"# r1kit run: {recipe.name}", "", f"Recipe: `{recipe.source}`. Wall-clock: {wall / 60:.1f} min "
             f"(${wall / 3600 * price:.4f} at ${price:.2f}/hour).", ""]
    if models:
        k = next((key.split("@")[1] for key in next(iter(models.values())) if key.startswith("cons@")), "16")
        lines += [f"## Models (held-out problems: {next(iter(models.values()))['problems']})", "",
                  f"| model | greedy | pass@1 (± se) | cons@{k} | pass@{k} | mean response tokens | thinks | "
                  "acc. thinking / direct |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        for name, m in models.items():
            thinks = "—" if m.get("thinking_rate") is None else f"{m['thinking_rate']:.0%}"
            lines.append(f"| {name} | {fmt(m['greedy'])} | {m['pass@1']:.3f} ± {m['pass@1_se']:.3f} | "
                         f"{m[f'cons@{k}']:.3f} | {m[f'pass@{k}']:.3f} | {m['mean_response_tokens']:.1f} | {thinks} | "
                         f"{fmt(m.get('accuracy_thinking'))} / {fmt(m.get('accuracy_direct'))} |")
        lines.append("")
    lines += ["## Targets", ""]
    for key, t in targets.items():
        lines.append(f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']}" + (f" ({t['detail']})" if t.get("detail")
                                                                                 else ""))
    lines += _scaling_tables(scaling)
    lines += ["", "## RL curves", ""]
    for name, curve in curves.items():
        if curve:
            first, last = curve[0], curve[-1]
            lines.append(f"- {name}: {len(curve)} steps; reward {first['reward']:.3f} → {last['reward']:.3f}; "
                         f"mean response tokens {first['mean_response_tokens']:.1f} → {last['mean_response_tokens']:.1f}"
                         f" (slope {_trend(curve):+.3f} tokens/step). Plots: `{name}_reward.png`, "
                         f"`{name}_accuracy.png`, `{name}_mean_response_tokens.png`.")
    lines += ["", "## Cost of each stage", "",
              "Tokens trained on (forward and backward) and sampled; FLOPs as 6 per active weight per trained token "
              "and 2 per sampled token.", "",
              "| stage | kind | wall-clock (s) | tokens trained | tokens sampled | FLOPs | cost (USD) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    for s in stages:
        lines.append(f"| {s['stage']} | {s['kind']} | {s['elapsed_s']:.0f} | {num(s['trained_tokens'])} | "
                     f"{num(s['generated_tokens'])} | {num(s['flops'], '{:.2e}')} | {s['cost_usd']:.5f} |")
    total = sum(s["flops"] or 0 for s in stages)
    lines.append(f"| **all** | | **{wall:.0f}** | | | **{total:.2e}** | **{wall / 3600 * price:.5f}** |")
    hw = results["hardware"]
    lines += ["", f"Hardware: {hw['processor']}, {hw['threads']} threads; Python {hw['python']}, torch {hw['torch']}.", ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        console.print(f"report: {out_dir / 'report.md'}  results: {out_dir / 'results.json'}")
    return results
