"""The recipe runner: every stage kind end to end on a miniature recipe, skip-if-done, reruns, bad recipes."""

import json
import shutil
from pathlib import Path

import pytest

from r1kit import pipeline
from r1kit.config import ConfigError
from common import small_checkpoint

SMOKE = Path(__file__).parent / "data" / "smoke.toml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = pipeline.load_recipe(SMOKE, out_root=out)
    pipeline.run(recipe)
    return recipe, out / "smoke"


def test_recipe_runs_every_stage_and_writes_the_report(smoke_run):
    recipe, run_dir = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["models"]) == {"base", "r1_zero", "cold_start", "student_distilled", "student_rl"}
    for m in results["models"].values():
        for key in ("greedy", "pass@1", "cons@4", "mean_response_tokens"):
            assert 0 <= m[key] <= (1 if key != "mean_response_tokens" else 12)
    assert results["r1_zero_curve"] and {"step", "reward", "accuracy", "mean_response_tokens"} <= set(results["r1_zero_curve"][0])
    assert results["wall_clock_s"] > 0 and len(results["targets"]) == 4
    report = (run_dir / "report.md").read_text()
    assert "## Targets" in report and ("NOT MET" in report or "MET" in report)
    zero = results["models"]["r1_zero"]  # why a vote does or does not gain: the problems split by agreement
    assert zero["problems_all_right"] + zero["problems_all_wrong"] + zero["problems_mixed"] == pytest.approx(1)
    assert "mixed on" in results["targets"]["cons_beats_pass"]["detail"] and "mixed on" in report
    assert (run_dir / "r1_zero_reward.png").exists() and (run_dir / "test_time_scaling.png").exists()
    assert [p["budget"] for p in results["scaling"]["r1_zero"]["budget"]] == [2, 6]
    assert (run_dir / "thinking_budget.png").exists()
    cost = {s["stage"]: s for s in results["stages"]}  # the work of each stage, and its FLOPs
    for name in ("base", "cold_start", "r1_zero", "rejection", "eval"):
        assert cost[name]["flops"] > 0, name
    assert cost["base"]["trained_tokens"] > 0 and cost["base"]["generated_tokens"] == 0
    assert cost["r1_zero"]["trained_tokens"] > cost["r1_zero"]["generated_tokens"] > 0  # prompts are trained too
    assert cost["eval"]["generated_tokens"] > 0 and cost["eval"]["trained_tokens"] == 0
    assert "| FLOPs |" in report and "| B = 2 | B = 6 |" in report and "| m = 1 | m = 2 | m = 4 |" in report
    data = [json.loads(line) for line in (run_dir / "rejection" / "data.jsonl").read_text().splitlines()]
    assert sum(1 for d in data if d["messages"][-1]["reasoning_content"] == "") == 10  # the non-reasoning part


def test_a_repeated_run_skips_done_stages_and_a_change_reruns_downstream(smoke_run, capsys):
    recipe, run_dir = smoke_run
    before = {s.name: json.loads((run_dir / s.name / "stage.json").read_text())["hash"] for s in recipe.stages}
    pipeline.run(pipeline.load_recipe(SMOKE, out_root=run_dir.parent))
    out = capsys.readouterr().out
    assert out.count("skipped") == len(recipe.stages)
    pipeline.run(pipeline.load_recipe(SMOKE, ["cold_start.max_steps=2"], out_root=run_dir.parent))
    steps = [json.loads(line)["step"] for line in (run_dir / "cold_start" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # new inputs start over, not from the old inputs' checkpoints and metrics
    after = {s.name: json.loads((run_dir / s.name / "stage.json").read_text())["hash"] for s in recipe.stages}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"cold_start", "rejection", "student_distilled", "student_rl", "eval"}


def test_budgeted_stage_stops_at_the_other_stages_wall_clock(smoke_run):
    _, run_dir = smoke_run
    rl = json.loads((run_dir / "student_rl" / "stage.json").read_text())
    assert rl.get("stopped_by_budget_at_step", 50) < 50


@pytest.mark.parametrize("text, match", [
    ('name = "x"\n[[stages]]\nname = "a"\nkind = "train"\n', r"stages\[0\] \(a\): kind='train': must be one of corpus"),
    ('name = "x"\nstagez = 1\n', r"unknown key 'stagez' \(allowed: name, report, stages\)"),
    ('[[stages]]\nname = "a"\nkind = "sft"\n', r"name: a recipe needs a name"),
    ('name = "x"\n[[stages]]\nname = "a"\nkind = "sft"\n[[stages]]\nname = "a"\nkind = "sft"\n', "used twice"),
    ('name = "x"\n[[stages\n', r"recipe.toml: .*line 2"),
])
def test_malformed_recipes_name_the_key(tmp_path, text, match):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        pipeline.load_recipe(path)


def test_overrides_must_name_a_stage(tmp_path):
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        pipeline.load_recipe(SMOKE, ["nope.max_steps=3"])


def test_default_recipe_parses():
    recipe = pipeline.load_recipe(pipeline.DEFAULT_RECIPE)
    kinds = [s.kind for s in recipe.stages]
    assert kinds.count("grpo") == 4 and kinds[-1] == "eval"


def test_cold_start_answers_are_bare_unless_boxed_is_asked(tmp_path):
    def cold(**settings):
        stage = pipeline.Stage("corpus", "corpus", {"cold_start": "addition?digits=2&size=5&seed=1", **settings})
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        path = pipeline._corpus(stage, out, {}, None)["cold_start"]
        return [json.loads(line)["messages"][-1] for line in open(path)]

    plain, boxed = cold(), cold(cold_start_answer="boxed")
    assert all(m["content"].isdigit() and m["reasoning_content"] for m in plain)
    assert [m["content"] for m in boxed] == [f"\\boxed{{{m['content']}}}" for m in plain]
    with pytest.raises(ConfigError, match="cold_start_answer"):
        cold(cold_start_answer="latex")


def test_a_distill_stage_feeds_sft(tmp_path):
    teacher = small_checkpoint(tmp_path / "teacher")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''name = "d"
[[stages]]
name = "samples"
kind = "distill"
teacher = "{teacher}"
task = "addition?digits=1&size=6&seed=2"
samples = 2
max_tokens = 8
reject = false
[[stages]]
name = "student"
kind = "sft"
model = "{teacher}"
data = "samples:data"
max_steps = 2
per_device_train_batch_size = 4
progress = false
''')
    r = pipeline.load_recipe(recipe, out_root=tmp_path / "runs")
    pipeline.run(r)
    done = json.loads((tmp_path / "runs" / "d" / "samples" / "stage.json").read_text())
    assert (done["asked"], done["kept"]) == (12, 12)
    assert len((tmp_path / "runs" / "d" / "samples" / "data.jsonl").read_text().splitlines()) == 12
    assert json.loads((tmp_path / "runs" / "d" / "student" / "stage.json").read_text())["step"] == 2
