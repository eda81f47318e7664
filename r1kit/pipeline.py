"""`r1kit run`: a recipe (TOML) of stages, each resumable and skipped when its output exists for the same inputs.

A recipe is a list of stages. Each stage has a `kind` — one of `corpus`, `pretrain`, `sft`, `grpo`, `rejection`,
`eval` — a `model` (a preset, or the name of an earlier stage whose model it starts from) and the settings of
that kind, which are the stage function's own config fields (see `r1kit pretrain --help` and friends). Stage
outputs live in `runs/<recipe name>/<stage name>/`; a `stage.json` written last (atomically) records the hash of
the stage's inputs — its settings and the hashes of the stages it reads — so an unchanged stage is skipped, a
changed one reruns along with everything downstream of it, and an interrupted one resumes from its own
checkpoints when the command is repeated.

The default recipe, `recipes/tiny.toml`, is the R1 paper in miniature: a base model, R1-Zero, cold start,
reasoning RL, rejection sampling + SFT, final RL, a distilled dense student against the same student trained by
RL alone, and an evaluation of every model with a report (see `r1kit.report`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.config import ConfigError

KINDS = ("corpus", "pretrain", "sft", "grpo", "rejection", "distill", "eval")
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.toml"


@dataclass
class Stage:
    name: str
    kind: str
    settings: dict[str, Any]
    inputs: list[str] = field(default_factory=list)  # earlier stages this one reads


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    out_dir: Path
    report: dict[str, Any]
    source: str


# ------------------------------------------------------------------------------------------------ parsing
def load_recipe(path: str | Path, overrides: list[str] | None = None, out_root: str | Path = "runs") -> Recipe:
    """Read and check a recipe; `overrides` are "stage.key=value" strings (value parsed as TOML)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for o in overrides or []:
        key, eq, value = o.partition("=")
        if not eq or "." not in key and key != "name":
            raise ConfigError(f"override {o!r}: write STAGE.KEY=VALUE (e.g. pretrain.max_steps=50) or name=NAME")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        if key == "name":
            data["name"] = parsed
            continue
        stage, _, field_ = key.partition(".")
        for st in data.get("stages", []):
            if st.get("name") == stage:
                st[field_] = parsed
                break
        else:
            names = [s.get("name") for s in data.get("stages", [])]
            raise ConfigError(f"override {o!r}: no stage {stage!r} in {path} (stages: {', '.join(map(str, names))})")
    allowed_top = {"name", "stages", "report"}
    for k in data:
        if k not in allowed_top:
            raise ConfigError(f"{path}: unknown key {k!r} (allowed: {', '.join(sorted(allowed_top))})")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ConfigError(f"{path}: name: a recipe needs a name (a string)")
    stages, seen = [], set()
    for i, st in enumerate(data.get("stages") or []):
        where = f"{path}: stages[{i}]"
        st = dict(st)
        name, kind = st.pop("name", None), st.pop("kind", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name: every stage needs a name")
        if name in seen:
            raise ConfigError(f"{where}: name={name!r} is used twice")
        if kind not in KINDS:
            raise ConfigError(f"{where} ({name}): kind={kind!r}: must be one of {', '.join(KINDS)}")
        refs = []
        for k in ("model", "tokenizer", "data", "models", "wall_clock_s", "teacher"):
            v = st.get(k)
            vals = list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else [v]
            refs += [x.partition(":")[0].partition("@")[0] for x in vals if isinstance(x, str)]
        inputs = sorted({r for r in refs if r in seen})
        stages.append(Stage(name, kind, st, inputs))
        seen.add(name)
    if not stages:
        raise ConfigError(f"{path}: stages: the recipe has none")
    return Recipe(data["name"], stages, Path(out_root) / data["name"], dict(data.get("report") or {}), str(path))


# ------------------------------------------------------------------------------------------------ running
def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    blob = json.dumps({"kind": stage.kind, "settings": stage.settings,
                       "inputs": {n: upstream[n] for n in stage.inputs}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows) -> Path:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def run(recipe: Recipe, *, only: list[str] | None = None, console=None) -> dict[str, Any]:
    """Run every stage (or the named ones and what they need), skipping those already done for the same inputs."""
    from rich.console import Console

    console = console or Console()
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    outputs: dict[str, dict] = {}
    t_run = time.perf_counter()
    for stage in recipe.stages:
        h = stage_hash(stage, hashes)
        hashes[stage.name] = h
        out = recipe.out_dir / stage.name
        done = out / "stage.json"
        if done.exists():
            prev = json.loads(done.read_text())
            if prev.get("hash") == h:
                console.print(f"[dim]{stage.name}: done earlier ({prev.get('elapsed_s', 0):.0f} s), skipped[/dim]")
                outputs[stage.name] = prev
                continue
            console.print(f"[yellow]{stage.name}: inputs changed since the last run: running again[/yellow]")
            done.unlink()
        if only and stage.name not in only:
            raise ConfigError(f"stage {stage.name!r} is needed but not done; run it too")
        console.rule(f"[bold]{stage.name}[/bold] ({stage.kind})")
        started = out / "stage.started.json"
        if out.exists() and (not started.exists() or json.loads(started.read_text()).get("hash") != h):
            # what is there (checkpoints included) came from other inputs: an interrupted run of the same inputs
            # resumes, anything else starts over
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(started, {"hash": h})
        t0 = time.perf_counter()
        result = STAGES[stage.kind](stage, out, outputs, recipe)
        elapsed = time.perf_counter() - t0
        record = {"hash": h, "kind": stage.kind, "elapsed_s": elapsed, **result}
        _write_json(done, record)
        outputs[stage.name] = record
        console.print(f"{stage.name}: {elapsed:.0f} s")
    summary = {"recipe": recipe.source, "stages": outputs, "wall_clock_s": sum(o.get("elapsed_s", 0) for o in outputs.values()),
               "this_run_s": time.perf_counter() - t_run}
    from r1kit import report

    report.write(recipe, outputs, recipe.out_dir, console=console)
    return summary


def _model_of(ref: str, outputs: dict[str, dict]) -> str:
    """A stage name -> that stage's model directory; anything else (a preset, a path) as given."""
    return outputs[ref]["model"] if ref in outputs else ref


# ------------------------------------------------------------------------------------------------- stages
def _corpus(stage: Stage, out: Path, outputs: dict, recipe: Recipe) -> dict:
    """Generate the training texts: a pretraining corpus and the cold-start conversations, from tasks.

    Settings: `answer_tasks` (specs whose problems appear with their answers alone), `trace_tasks` (specs whose
    problems appear with step-by-step reasoning), `trace_fraction` (of the trace tasks' problems, the share
    written with a trace; default 1), `cold_start` (spec for the cold-start SFT conversations) and
    `cold_start_answer` ("plain", the default: the bare answer; "boxed": "\\boxed{answer}"). Documents are
    written in the R1-Zero template, the paper's plain-text format.
    """
    from r1kit import tasks
    from r1kit.tokenizer import R1_ZERO_TEMPLATE, render_template

    s = stage.settings
    rng = random.Random(s.get("seed", 0))
    docs = []

    def render(messages):
        return render_template(R1_ZERO_TEMPLATE, messages, False, bos_token="")[0].strip()

    for spec in s.get("answer_tasks", []):
        for ex in tasks.load(spec):  # the answer alone: what a base model knows without thinking
            docs.append(render(ex.chat() + [{"role": "assistant", "content": ex.answer, "reasoning_content": ""}]))
    fraction = float(s.get("trace_fraction", 1.0))
    if not 0 <= fraction <= 1:
        raise ConfigError(f"stage {stage.name!r}: trace_fraction must be within [0, 1], got {fraction}")
    for spec in s.get("trace_tasks", []):
        task = tasks.load(spec)
        for ex in task:  # worked solutions: thinking the model can learn, and use when it chooses to
            if rng.random() >= fraction:
                continue
            trace = task.trace(ex)
            if trace:
                docs.append(render(ex.chat() + [{"role": "assistant", "content": ex.answer, "reasoning_content": trace}]))
    rng.shuffle(docs)
    corpus = _write_jsonl(out / "corpus.jsonl", ({"text": d} for d in docs))
    convs = []
    if s.get("cold_start"):
        task = tasks.load(s["cold_start"])
        boxed = s.get("cold_start_answer", "plain")
        if boxed not in ("plain", "boxed"):
            raise ConfigError(f"stage {stage.name!r}: cold_start_answer={boxed!r}: must be 'plain' or 'boxed'")
        for ex in task:
            m = task.sft_messages(ex)
            if m and boxed == "plain" and not (ex.messages and ex.messages[-1].get("role") == "assistant"):
                # the bare answer, as the documents give it inside <answer> tags: a "\boxed{}" the base never
                # wrote took the cold-start model's sampled accuracy from 0.61 to 0.08 (docs/RESULTS.md)
                m[-1] = {**m[-1], "content": ex.answer}
            if m:
                convs.append(m)
    cold = _write_jsonl(out / "cold_start.jsonl", ({"messages": m} for m in convs))
    return {"corpus": str(corpus), "cold_start": str(cold), "documents": len(docs), "conversations": len(convs)}


def _train_stage(fn_name: str):
    def stage_fn(stage: Stage, out: Path, outputs: dict, recipe: Recipe) -> dict:
        import importlib

        settings = dict(stage.settings)
        for key in ("model", "tokenizer"):
            if key in settings:
                settings[key] = _model_of(settings[key], outputs)
        if isinstance(settings.get("data"), str):
            ref, _, part = settings["data"].partition(":")
            if ref in outputs:  # "corpus:corpus" -> that stage's output file of that name
                settings["data"] = outputs[ref][part or "data"]
        budget = settings.pop("wall_clock_s", None)
        if isinstance(budget, str):  # "the same wall-clock as that stage"
            if budget not in outputs:
                raise ConfigError(f"stage {stage.name}: wall_clock_s={budget!r} names no earlier stage")
            budget = outputs[budget]["elapsed_s"]
        settings["output_dir"] = str(out)
        fn = getattr(importlib.import_module(f"r1kit.{fn_name}"), fn_name)
        if budget:  # "the same wall-clock": stop at the first step boundary past the budget
            settings.update(save_steps=1, save_total_limit=1)  # so the stop can resume at once from that step
            t0 = time.perf_counter()

            def on_step(step, metrics):
                if time.perf_counter() - t0 > budget:
                    raise _Budget(step)

            try:
                return {k: v for k, v in fn(settings, on_step=on_step).items()}
            except _Budget as b:
                settings["max_steps"] = b.step
                settings["resume"] = "auto"
                return {**fn(settings), "stopped_by_budget_at_step": b.step}
        return fn(settings)

    return stage_fn


class _Budget(Exception):
    def __init__(self, step: int):
        self.step = step


def _rejection(stage: Stage, out: Path, outputs: dict, recipe: Recipe) -> dict:
    """Rejection sampling (R1 §2.3.3): sample k answers per training prompt from a model, keep the correct,
    well-formed ones (at most `keep_per_prompt`), add `non_reasoning` examples answered without thinking, and
    write them as conversations for SFT. `chat_template` picks the prompt format (default: the model's own);
    `compile = true` compiles the engine's decode step."""
    from r1kit import tasks
    from r1kit.engine import LLM, SamplingParams
    from r1kit.rewards import accuracy_reward, format_reward
    from r1kit.tokenizer import split_reasoning

    s = stage.settings
    llm = LLM(_model_of(s["model"], outputs), max_num_seqs=s.get("max_num_seqs", 64), compile=s.get("compile", False))
    tok = llm.tokenizer
    task = tasks.load(s["task"])
    examples = list(task.examples)[: s.get("prompts", len(task))]
    template = s.get("chat_template")  # r1, r1-zero, or the tokenizer's own
    prompts = [tok.apply_chat_template(e.chat(), add_generation_prompt=True, chat_template=template) for e in examples]
    outs = llm.generate(prompts, SamplingParams(n=s.get("k", 4), temperature=s.get("temperature", 0.7),
                                                top_p=s.get("top_p", 0.95), max_tokens=s.get("max_tokens", 256),
                                                seed=s.get("seed", 0)).per_prompt(len(prompts)), use_tqdm=True)
    prefilled = bool(prompts) and prompts[0].rstrip().endswith("<think>")
    keep = s.get("keep_per_prompt", 1)
    convs, tried, right = [], 0, 0
    for ex, o in zip(examples, outs):
        kept = 0
        for c in o.outputs:
            tried += 1
            text = ("<think>\n" if prefilled else "") + c.text
            if accuracy_reward(c.text, ex, prefilled=prefilled) >= 1 and format_reward(text) >= 1:
                right += 1
                if kept < keep:
                    reasoning, answer = split_reasoning(c.text, prefilled)
                    convs.append(ex.chat() + [{"role": "assistant", "reasoning_content": reasoning.strip(),
                                               "content": answer.strip()}])
                    kept += 1
    for spec in s.get("non_reasoning", []):  # answered directly, with an empty think block (as DeepSeek did)
        for ex in tasks.load(spec):
            convs.append(ex.chat() + [{"role": "assistant", "reasoning_content": "", "content": ex.answer}])
    random.Random(s.get("seed", 0)).shuffle(convs)
    data = _write_jsonl(out / "data.jsonl", ({"messages": m} for m in convs))
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n = _active_params(_model_of(s["model"], outputs))
    return {"data": str(data), "samples": tried, "correct_and_well_formed": right, "kept": len(convs),
            "generated_tokens": generated, "flops": None if n is None else 2 * n * generated}


def _distill(stage: Stage, out: Path, outputs: dict, recipe: Recipe) -> dict:
    """Teacher samples (`r1kit.distill`): `teacher` is an earlier stage or a checkpoint directory, or `teacher_url`
    an OpenAI-compatible endpoint; every `r1kit distill` option is a setting. Kept samples go to data.jsonl (read
    it as "STAGE:data"); an interrupted stage asks only for what it does not have yet."""
    from r1kit.distill import distill

    s = dict(stage.settings)
    if s.get("teacher"):
        s["teacher"] = _model_of(s["teacher"], outputs)
    res = distill({**s, "output": str(out / "data.jsonl")}, progress=True)
    return {k: res[k] for k in ("asked", "kept", "rejected", "already_done")} | {"data": res["output"]}


def _eval(stage: Stage, out: Path, outputs: dict, recipe: Recipe) -> dict:
    """Every model on the held-out tasks. `models = {name = "stage"}`, or "stage@template" for a model that
    speaks another chat template than its tokenizer's own (a base pretrained on R1-Zero's plain-text format: sft and
    grpo stages save the template they trained on as the model's own)."""
    import dataclasses

    from r1kit import eval as E

    s = dict(stage.settings)
    cfg = E.EvalConfig(**{k: v for k, v in s.items() if k != "models"})
    results, generated, flops = {}, 0, 0.0
    for name, ref in s["models"].items():
        ref, _, template = ref.partition("@")
        one = dataclasses.replace(cfg, template=template or cfg.template)
        path = _model_of(ref, outputs)
        results.update(E.evaluate({name: path}, one, progress=True))
        tokens = sum(r["generated_tokens"] for r in results[name].values())
        n = _active_params(path)
        generated += tokens
        flops = None if flops is None or n is None else flops + 2 * n * tokens
    E.write(results, cfg, out / "results.json")
    return {"results": str(out / "results.json"), "generated_tokens": generated, "flops": flops}


def _active_params(model_dir: str | Path) -> int | None:
    """Weights a token passes through (a forward costs ~2 FLOPs each), for the stages' FLOPs; None when the model
    is not a checkpoint directory (a preset) or has moved since."""
    from r1kit import config as C
    from r1kit.model import count_params

    try:
        return count_params(C.ModelConfig.load(model_dir))[1]
    except (ConfigError, OSError):
        return None


STAGES = {"corpus": _corpus, "pretrain": _train_stage("pretrain"), "sft": _train_stage("sft"),
          "grpo": _train_stage("grpo"), "rejection": _rejection, "distill": _distill, "eval": _eval}
