"""User data as tasks: JSONL, JSON, Parquet, and Hugging Face `datasets` directories, read without `datasets`.

A row becomes an `Example` from any of these layouts (field names are matched case-insensitively):

- `prompt` (a string, or a list of chat messages) + `answer`, or `question` + `answer`;
- `messages` (a chat; `answer` given, or read from the final assistant turn's `\\boxed{}`);
- GSM8K: `question` + `answer`, the final answer after "####";
- MATH / MATH-500: `problem` + `answer`, or `problem` + `solution` with the answer in its last `\\boxed{}`;
- AIME: `problem` + `answer`, an integer.

A `save_to_disk` directory is read from its arrow files with pyarrow (a `DatasetDict` by its `split`); any other
directory by the .jsonl/.json/.parquet files in it. Benchmark rows get R1's evaluation instruction ("Please reason
step by step, and put your final answer within \\boxed{}.") after the problem, unless `instruction=` says
otherwise. Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from r1kit.tasks import DataError, Example

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_DEFAULT = object()


def read(path: str, layout: str | None = None, size: int | None = None, split: str | None = None,
         instruction: Any = _DEFAULT, scorer: str = "math") -> list[Example]:
    """Read every row of `path` as an Example; `layout` forces one of "gsm8k", "math", "aime"."""
    if layout not in (None, "gsm8k", "math", "aime"):
        raise ValueError(f"unknown layout {layout!r}: choose gsm8k, math or aime")
    if scorer not in ("math", "exact"):
        raise ValueError(f"unknown scorer {scorer!r} for file data: choose math or exact")
    examples = []
    for file, line, row in _rows(Path(path), split):
        if not isinstance(row, dict):
            raise DataError(f"expected an object with fields, got {type(row).__name__}", file, line)
        example = _example(row, layout, file, line, instruction)
        example.scorer = scorer
        example.meta.update(source=file, line=line)
        examples.append(example)
        if size is not None and len(examples) >= int(size):
            break
    if not examples:
        raise DataError("no examples: the dataset is empty", str(path))
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Rows: (file, line or "row N", dict)


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, Any, Any]]:
    if not path.exists():
        raise DataError("no such file or directory", str(path))
    if path.is_dir():
        yield from _dir_rows(path, split)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    elif path.suffix == ".parquet":
        yield from _table_rows(path, _read_parquet(path))
    elif path.suffix == ".arrow":
        yield from _table_rows(path, _read_arrow(path))
    else:
        raise DataError(f"unknown file type {path.suffix!r}: use .jsonl, .json, .parquet, .arrow or a directory",
                        str(path))


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield str(path), n, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", str(path), n) from None


def _json_rows(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", str(path), e.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a list of objects (or {\"data\": [...]})", str(path))
    for i, row in enumerate(data, 1):
        yield str(path), f"row {i}", row


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read Parquet: {e}", str(path)) from None


def _read_arrow(path: Path):
    import pyarrow as pa

    try:  # save_to_disk writes the IPC stream format; the file format is tried too
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception:  # noqa: BLE001
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read Arrow: {e}", str(path)) from None


def _table_rows(path: Path, table):
    for i, row in enumerate(table.to_pylist(), 1):
        yield str(path), f"row {i}", row


def _dir_rows(path: Path, split: str | None):
    if (path / "dataset_dict.json").exists():  # a DatasetDict: one directory per split
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split is None:
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise DataError(f"choose a split with ?split=NAME; this dataset has {splits}", str(path),
                            field="split")
        yield from _dir_rows(path / split, None)
        return
    if (path / "state.json").exists():  # a Dataset written by save_to_disk
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / f["filename"] for f in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
        for file in files:
            yield from _table_rows(file, _read_arrow(file))
        return
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet", ".arrow")
                   and (split is None or split in p.name))
    for file in files:
        yield from _rows(file, None)


# ----------------------------------------------------------------------------------------------------------------
# A row as an Example


def _field(row: dict, name: str) -> Any:
    for key, value in row.items():
        if str(key).lower() == name:
            return value
    return None


def _text(value: Any, file, line, name: str) -> str:
    if value is None:
        raise DataError("missing field", file, line, name)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"expected text, got {type(value).__name__}", file, line, name)
    text = str(value).strip()
    if not text:
        raise DataError("empty field", file, line, name)
    return text


def _example(row: dict, layout: str | None, file, line, instruction) -> Example:
    if layout is None:  # recognize the layout by its fields
        if _field(row, "messages") is not None:
            return _chat_example(row, file, line)
        if _field(row, "prompt") is not None:
            prompt = _field(row, "prompt")
            answer = _text(_field(row, "answer"), file, line, "answer")
            if isinstance(prompt, list):  # a conversational prompt (TRL's format)
                return _chat_example({"messages": prompt, "answer": answer}, file, line, field="prompt")
            prompt = _text(prompt, file, line, "prompt")
            return Example(prompt=_with(prompt, instruction, None), answer=answer)
        if _field(row, "question") is not None and "####" in str(_field(row, "answer") or ""):
            layout = "gsm8k"
        elif _field(row, "question") is not None:  # question + answer: a prompt by another name
            return Example(prompt=_with(_text(_field(row, "question"), file, line, "question"), instruction, None),
                           answer=_text(_field(row, "answer"), file, line, "answer"))
        elif _field(row, "problem") is not None:
            layout = "math"
        else:
            raise DataError("missing field; a row needs prompt + answer, messages, question + answer (GSM8K) or "
                            "problem + answer/solution (MATH, AIME)", file, line, "prompt")
    if layout == "gsm8k":
        question = _text(_field(row, "question"), file, line, "question")
        solution = _text(_field(row, "answer"), file, line, "answer")
        if "####" not in solution:
            raise DataError("no final answer after '####'", file, line, "answer")
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise DataError("empty final answer after '####'", file, line, "answer")
        return Example(prompt=_with(question, instruction, R1_INSTRUCTION), answer=answer, meta={"solution": solution})
    problem = _text(_field(row, "problem"), file, line, "problem")
    if layout == "aime":
        raw = _text(_field(row, "answer"), file, line, "answer")
        try:
            answer = str(int(float(raw))) if float(raw) == int(float(raw)) else None
        except ValueError:
            answer = None
        if answer is None:
            raise DataError(f"AIME answers are integers, got {raw!r}", file, line, "answer")
        return Example(prompt=_with(problem, instruction, R1_INSTRUCTION), answer=answer)
    # MATH: the answer field when there is one (MATH-500), else the solution's last \boxed{}
    meta = {}
    if _field(row, "answer") is not None and str(_field(row, "answer")).strip():
        answer = _text(_field(row, "answer"), file, line, "answer")
    else:
        from r1kit.rewards import last_boxed

        solution = _text(_field(row, "solution"), file, line, "solution")
        answer = (last_boxed(solution) or "").strip()
        if not answer:
            raise DataError("no \\boxed{} answer in the solution", file, line, "solution")
        meta["solution"] = solution
    return Example(prompt=_with(problem, instruction, R1_INSTRUCTION), answer=answer, meta=meta)


def _with(prompt: str, instruction: Any, default: str | None) -> str:
    text = default if instruction is _DEFAULT else instruction
    return f"{prompt}\n{text}" if text else prompt


def _chat_example(row: dict, file, line, field: str = "messages") -> Example:
    messages = _field(row, "messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of {role, content} messages", file, line, field)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} needs a string 'role' and a string 'content'", file, line, field)
        clean.append({k: v for k, v in m.items() if v is not None})
    users = [m["content"] for m in clean if m["role"] == "user"]
    if not users:
        raise DataError("no user message", file, line, field)
    answer = _field(row, "answer")
    if answer is not None:
        answer = _text(answer, file, line, "answer")
    elif clean[-1]["role"] == "assistant":
        from r1kit.rewards import last_boxed
        from r1kit.tokenizer import split_reasoning

        final = split_reasoning(clean[-1]["content"])[1]
        answer = (last_boxed(final) or final).strip()
        if not answer:
            raise DataError("no answer: the final assistant message is empty", file, line, field)
    else:
        raise DataError("missing field (or end the messages with the assistant's answer)", file, line, "answer")
    return Example(prompt=users[-1], answer=answer, messages=clean)
