"""Tasks: spec strings, deterministic data, correct traces, content-disjoint splits, and user files read (or
refused with an error that names the file, the line and the field)."""

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1kit import rewards, tasks
from r1kit.tasks import DataError, Example
from r1kit.tasks.arithmetic import evaluate, trace_steps


def test_parse_spec_types_options():
    assert tasks.parse_spec("reasoning-gym:chain_sum?size=50&seed=1&allow_negation=true&x=0.5&ops=+,-&s=a%26b") == (
        "reasoning-gym:chain_sum", {"size": 50, "seed": 1, "allow_negation": True, "x": 0.5, "ops": ("+", "-"),
                                    "s": "a&b"})
    with pytest.raises(ValueError, match="key=value"):
        tasks.parse_spec("addition?digits")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load("no-such-task")
    with pytest.raises(ValueError, match="unexpected keyword"):
        tasks.load("addition?colour=red")


@pytest.mark.parametrize("spec", ["addition?digits=3&size=300", "addition?digits=4&min_digits=1&terms=3&size=300",
                                  "arithmetic?size=300", "arithmetic?terms=5&min_terms=2&digits=2&size=300"])
def test_default_tasks_are_deterministic_and_their_traces_are_right(spec):
    task = tasks.load(spec)
    assert len(task) == 300 and len({e.prompt for e in task}) == 300  # distinct problems
    assert [e.prompt for e in task] == [e.prompt for e in tasks.load(spec)]  # same seed, same data
    assert [e.prompt for e in task] != [e.prompt for e in tasks.load(spec + "&seed=1")]
    for example in task:
        trace = task.trace(example)
        assert trace and len(trace) < 200  # short: tens of tokens
        if spec.startswith("addition"):
            _check_addition_trace(example, trace)
        else:
            _check_arithmetic_trace(example, trace)


def _check_addition_trace(example, trace):
    # replay it: every column sums what it says, and the written digits, read back, are the answer
    written, carry = [], 0
    for line in trace.splitlines():
        m = re.fullmatch(r"([\d+]+)=(\d+), write (\d+)(?: carry (\d+))?", line)
        assert m, line
        assert sum(map(int, m.group(1).split("+"))) == int(m.group(2))
        assert int(m.group(1).split("+")[-1]) == carry or carry == 0
        written.append(m.group(3))
        carry = int(m.group(4) or 0)
        assert int(m.group(2)) == int(m.group(3)) + 10 * carry or line == trace.splitlines()[-1]
    assert "".join(reversed(written)) == example.answer == str(sum(example.meta["operands"]))


def _check_arithmetic_trace(example, trace):
    lines = trace.splitlines()
    for line in lines:
        step, _, rest = line.partition(", so ")
        left, right = step.rsplit("=", 1)
        assert evaluate(left) == int(right), line  # each step is one right operation
        if rest:
            assert evaluate(rest) == int(example.answer)  # and what remains still has the answer
    assert lines[-1].rsplit("=", 1)[1] == example.answer == str(evaluate(example.meta["expression"]))


def test_precedence_and_signs_in_traces():
    assert trace_steps("3+4*5-6") == [("4*5=20", "3+20-6"), ("3+20=23", "23-6"), ("23-6=17", "17")]
    assert trace_steps("-( 313 - -854 ) - -741 * 247")[-1][1] == "181860"
    assert [s for s, _ in trace_steps("(2+3)*(4-6)")] == ["2+3=5", "4-6=-2", "5*(-2)=-10"]
    assert evaluate("( 69 / 3 )") == 23


def test_traces_make_cold_start_data_that_earns_full_reward():
    task = tasks.load("arithmetic?size=20")
    for example in task:
        messages = task.sft_messages(example)
        assert messages[0] == {"role": "user", "content": example.prompt}
        completion = f"<think>\n{messages[1]['reasoning_content']}\n</think>\n\n{messages[1]['content']}"
        assert rewards.format_reward(completion) == 1.0
        assert rewards.accuracy_reward(completion, example) == task.reward(completion, example) == 1.0
        assert task.score(example.answer, example) == 1.0 and task.score("0.5", example) == 0.0


def test_reasoning_gym_tasks():
    task = tasks.load("reasoning-gym:chain_sum?size=30&seed=1&min_terms=3&max_terms=3")
    assert len(task) == 30 and all(e.scorer == "reasoning-gym" for e in task)
    assert [e.prompt for e in task] == [e.prompt for e in tasks.load("rg:chain_sum?size=30&seed=1&min_terms=3&"
                                                                       "max_terms=3")]
    example = task[0]
    assert task.score(example.answer, example) == 1.0 and task.score("12345678", example) == 0.0
    assert all(task.trace(e) for e in task)  # chain sums have step-by-step traces
    checked = tasks.load("reasoning-gym:graph_color?size=2&seed=0")  # no single gold: scored by checking
    example, puzzle = checked[0], checked[0].meta["entry"]["metadata"]["puzzle"]
    coloring = {str(v): 1 for v in puzzle["vertices"]}
    for a, b in puzzle["edges"]:  # any proper colouring is right, not just the one the generator had in mind
        coloring[str(b)] = 3 if coloring[str(a)] == 2 else 2
    assert example.answer == "" and checked.score(json.dumps(coloring), example) == 1.0
    assert checked.score(json.dumps({str(v): 1 for v in puzzle["vertices"]}), example) < 1.0
    assert checked.trace(example) is None
    with pytest.raises(ValueError, match="no dataset"):
        tasks.load("reasoning-gym:no_such_thing")
    with pytest.raises(ValueError, match="its options are"):
        tasks.load("reasoning-gym:chain_sum?colour=red")


def test_splits_are_disjoint_by_content_and_deterministic():
    task = tasks.load("addition?digits=2&size=400")
    # duplicates (the same prompt twice) must land on one side only
    task.examples += [Example(e.prompt, e.answer) for e in task.examples[:50]]
    train, test = task.split(test_size=40, seed=0)
    assert len({e.key() for e in test}) == 40 and len(train) + len(test) == 450
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    shuffled = tasks.Task(task.name, random.Random(0).sample(task.examples, len(task.examples)))
    assert {e.prompt for e in shuffled.split(40, seed=0)[1]} == {e.prompt for e in test}  # order does not matter
    assert {e.prompt for e in task.split(40, seed=1)[1]} != {e.prompt for e in test}
    assert len(task.split(0.25)[1]) >= 100
    # the same question in other clothes (spacing, case, a system prompt) is the same problem
    clothed = tasks.Task("t", [Example("What is 2+3?", "5"), Example(" what is  2+3? ", "5"),
                               Example("What is 2+3?", "5", messages=[{"role": "system", "content": "Be brief."},
                                                                      {"role": "user", "content": "What is 2+3?"}]),
                               Example("What is 4+4?", "8")])
    train, test = clothed.split(1)
    assert {len(train), len(test)} == {1, 3}
    with pytest.raises(ValueError):
        task.split(10_000)


# ----------------------------------------------------------------------------------------------------------------
# User data


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_prompt_answer_and_messages(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2+2?", "answer": 4},
        "",
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "<think>3+3=6</think> \\boxed{6}"}]},
        {"prompt": [{"role": "user", "content": "5+5?"}], "answer": "10"},
        {"Problem": "Find x.", "Answer": "7"},
    ])
    task = tasks.load(str(path))
    assert [e.answer for e in task] == ["4", "6", "10", "7"]
    assert task[0].meta["line"] == 1 and task[1].meta["line"] == 3  # lines as in the file, blanks counted
    assert task[1].chat() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}]
    assert task.sft_messages(task[1])[-1]["role"] == "assistant"
    assert task[2].chat() == [{"role": "user", "content": "5+5?"}]
    assert task[3].prompt.endswith(tasks.files.R1_INSTRUCTION)
    assert len(tasks.load(f"{path}?size=2")) == 2
    assert tasks.load(f"jsonl:{path}?instruction=").examples[3].prompt == "Find x."


def test_benchmark_layouts(tmp_path):
    gsm8k = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 ...", "answer": "3*4=12\n#### 1,200"}])
    math = _jsonl(tmp_path / "math.jsonl", [
        {"problem": "Simplify.", "solution": "So $\\boxed{\\frac{\\sqrt{3}}{2}}$ and not \\boxed{1}... wait:"
                                             " \\boxed{\\frac{1}{\\sqrt{4}}}"},
        {"problem": "MATH-500 style", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"},
    ])
    aime = _jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "How many?", "Answer": "033"}])
    assert [(e.answer, e.prompt.endswith("\\boxed{}.")) for e in tasks.load(f"gsm8k:{gsm8k}")] == [("1200", True)]
    assert [e.answer for e in tasks.load(str(gsm8k))] == ["1200"]  # recognized without the prefix too
    assert [e.answer for e in tasks.load(f"math:{math}")] == ["\\frac{1}{\\sqrt{4}}",
                                                              "\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert [e.answer for e in tasks.load(f"aime:{aime}")] == ["33"]
    with pytest.raises(DataError, match=r"aime2\.jsonl:1: AIME answers are integers.*field 'answer'"):
        tasks.load(f"aime:{_jsonl(tmp_path / 'aime2.jsonl', [{'problem': 'p', 'answer': '1/2'}])}")
    bad_gsm8k = _jsonl(tmp_path / "g2.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"g2\.jsonl:2: no final answer after '####' \(field 'answer'\)"):
        tasks.load(f"gsm8k:{bad_gsm8k}")
    bad_math = _jsonl(tmp_path / "m2.jsonl", [{"problem": "p", "solution": "an open box \\boxed{"}])
    with pytest.raises(DataError, match=r"m2\.jsonl:1: no \\boxed\{\} answer in the solution \(field 'solution'\)"):
        tasks.load(f"math:{bad_math}")


def test_parquet_and_hf_save_to_disk_directories(tmp_path):
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [e.answer for e in tasks.load(f"parquet:{tmp_path / 'd.parquet'}")] == ["1", "2", "3", "4", "5"]

    # what datasets' save_to_disk writes: arrow stream files listed in state.json, a DatasetDict above them
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        d = tmp_path / "hf" / split
        d.mkdir(parents=True)
        table = pa.Table.from_pylist(part)
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                  "_split": split}))
        (d / "dataset_info.json").write_text("{}")
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [e.answer for e in tasks.load(str(tmp_path / "hf"))] == ["1", "2", "3"]
    assert [e.answer for e in tasks.load(f"hf:{tmp_path / 'hf'}?split=test")] == ["4", "5"]
    assert [e.answer for e in tasks.load(str(tmp_path / "hf" / "test"))] == ["4", "5"]
    with pytest.raises(DataError, match="this dataset has"):
        tasks.load(f"{tmp_path / 'hf'}?split=validation")

    pq.write_table(pa.Table.from_pylist([{"prompt": "ok", "answer": "1"}, {"prompt": "no answer"}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 2: missing field \(field 'answer'\)"):
        tasks.load(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "a", "answer": "1"}, '{"prompt": "b", "answer": '], r"d\.jsonl:2: malformed JSON"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], r"d\.jsonl:2: missing field \(field 'answer'\)"),
    ([{"prompt": "  ", "answer": "1"}], r"d\.jsonl:1: empty field \(field 'prompt'\)"),
    ([{"query": "q"}], r"d\.jsonl:1: missing field; a row needs .* \(field 'prompt'\)"),
    ([{"question": "q"}], r"d\.jsonl:1: missing field \(field 'answer'\)"),
    ([{"prompt": "a", "answer": {"x": 1}}], r"d\.jsonl:1: expected text, got dict \(field 'answer'\)"),
    ([[1, 2]], r"d\.jsonl:1: expected an object"),
    ([{"messages": [{"role": "user"}]}], r"d\.jsonl:1: message 0 needs .* \(field 'messages'\)"),
    ([{"messages": [{"role": "user", "content": "q"}]}], r"d\.jsonl:1: missing field .* \(field 'answer'\)"),
    ([], r"d\.jsonl: no examples: the dataset is empty"),
])
def test_bad_data_names_file_line_and_field(tmp_path, rows, match):
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match) as info:
        tasks.load(str(path))
    assert isinstance(info.value, ValueError) and info.value.file.endswith("d.jsonl")


def test_missing_files_and_unknown_types(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        tasks.load(f"jsonl:{tmp_path / 'nothing.jsonl'}")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        tasks.load(str(tmp_path / "d.csv"))


def test_heldout_option_gives_disjoint_train_and_test_specs():
    base = "addition?digits=2&size=300&seed=5&test_size=40"
    train, test = tasks.load(base + "&heldout=train"), tasks.load(base + "&heldout=test")
    assert len(test) == 40 and len(train) == 260
    assert not {e.key() for e in train} & {e.key() for e in test}
    with pytest.raises(ValueError, match="heldout must be 'train' or 'test'"):
        tasks.load("addition?digits=2&size=30&heldout=dev&test_size=3")


def test_system_option_asks_every_problem_under_that_prompt():
    spec = "addition?digits=2&size=40&seed=3&heldout=test&test_size=10"
    plain = tasks.load(spec)
    sys = tasks.load(spec + "&system=Think%2C then answer: a%3Db.")  # commas and "=" kept as text
    assert [e.prompt for e in sys] == [e.prompt for e in plain]  # the same held-out problems
    for e in sys:
        assert e.chat() == [{"role": "system", "content": "Think, then answer: a=b."},
                            {"role": "user", "content": e.prompt}]
        assert sys.trace(e) == plain.trace(next(p for p in plain if p.prompt == e.prompt))


def test_modular_arithmetic_reduces_every_step():
    task = tasks.load("arithmetic?terms=3&min_terms=3&modulus=10&size=200&seed=2")
    assert len(task) == 200
    for e in task:
        assert e.prompt.endswith(" modulo 10?") and 0 <= int(e.answer) <= 9
        lines = task.trace(e).split("\n")
        assert len(lines) == 2 and lines[-1].endswith(f"={e.answer}")
        for line in lines:  # every operation's result is one digit, the rest rewritten with it
            assert 0 <= int(line.split(",")[0].split("=")[1]) <= 9
    seven = tasks.Example("What is 7*4+7 modulo 10?", "5", meta={"expression": "7*4+7", "modulus": 10})
    assert task.trace(seven) == "7*4=8, so 8+7\n8+7=5"
    assert tasks.load("arithmetic?terms=2&min_terms=2&modulus=10&size=300&seed=0").examples  # the 2-number facts
    with pytest.raises(ValueError, match="modulus"):
        tasks.load("arithmetic?modulus=1")
