"""Tasks: problems with verifiable answers, addressed by a spec string.

RL with verifiable rewards (R1 paper §2.2) needs prompts whose answers a program can check. A task is a list of
`Example`s (problem text, gold answer, how to score it) plus, for the default tasks, a writer of step-by-step
solutions: the cold-start SFT data of the tiny recipe (R1 §2.3.1).

    tasks.load("addition?digits=3&size=2000&seed=0")             # built-in, with traces (tasks/arithmetic.py)
    tasks.load("arithmetic?terms=4&digits=1")
    tasks.load("reasoning-gym:chain_sum?size=5000&seed=1")       # any reasoning-gym dataset (tasks/gym.py)
    tasks.load("data/train.jsonl")                               # user data (tasks/files.py): JSONL, Parquet,
    tasks.load("gsm8k:data/gsm8k/test.jsonl")                    #   HF save_to_disk dirs; GSM8K, MATH, AIME
    train, test = task.split(test_size=200)                      # by content: no prompt on both sides

Options after "?" are typed (ints, floats, true/false, comma lists) and go to the loader; `size` and `seed` are
understood by all, and so are `heldout=train|test&test_size=N` (one side of a split) and `system=TEXT` (every
problem asked under that system prompt; percent-encode "&" and "=" in it). User data errors raise `DataError`, naming the file, the line and the field. See
docs/DATA.md for the file layouts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator
from urllib.parse import unquote


class DataError(ValueError):
    """Bad user data: says which file, which line (or row) and which field."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(x) for x in (file, line) if x is not None)
        what = f" (field '{field}')" if field else ""
        super().__init__(f"{where}: {message}{what}" if where else f"{message}{what}")
        self.file, self.line, self.field = file, line, field


@dataclass
class Example:
    """One problem. `prompt` is the user's question; `messages`, when the data came as a conversation, holds it
    whole (a system prompt, earlier turns, perhaps the assistant's worked answer). `scorer` says how an answer is
    checked: "math" (numbers, LaTeX, letters; the default), "exact" or "reasoning-gym"."""

    prompt: str
    answer: str
    scorer: str = "math"
    meta: dict = field(default_factory=dict)
    messages: list[dict] | None = None

    def chat(self) -> list[dict]:
        """The conversation to generate from: everything before the final assistant turn."""
        if self.messages:
            messages = list(self.messages)
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            return messages
        return [{"role": "user", "content": self.prompt}]

    def key(self) -> str:
        """What the example asks, for splits: its question with case and spacing normalized (a system prompt or a
        reworded instruction around the same question does not make it a different problem)."""
        return " ".join(self.prompt.split()).casefold()


@dataclass
class Task:
    """A named list of examples, how to score them, and (for the default tasks) a trace writer."""

    name: str
    examples: list[Example]
    trace_writer: Callable[[Example], str | None] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def score(self, answer: str, example: Example) -> float:
        """Score an extracted answer (what follows the reasoning) against the example's gold, in [0, 1]."""
        from r1kit.rewards import check_answer

        return check_answer(answer, example)

    def reward(self, completion: str, example: Example) -> float:
        """Score a whole completion: its answer is split from its reasoning first."""
        from r1kit.rewards import accuracy_reward

        return accuracy_reward(completion, example)

    def trace(self, example: Example) -> str | None:
        """A step-by-step solution, or None when this task has no writer (or it cannot explain this one)."""
        return self.trace_writer(example) if self.trace_writer else None

    def sft_messages(self, example: Example) -> list[dict] | None:
        """A training conversation: the data's own worked answer, else the trace and the boxed answer."""
        if example.messages and example.messages[-1].get("role") == "assistant":
            return list(example.messages)
        trace = self.trace(example)
        if trace is None:
            return None
        return example.chat() + [{"role": "assistant", "reasoning_content": trace,
                                  "content": f"\\boxed{{{example.answer}}}"}]

    def split(self, test_size: int | float, seed: int = 0) -> tuple["Task", "Task"]:
        """(train, test) by content: prompts are ranked by a seeded hash of their text, so the split is the same
        whatever the order of the data, and copies of one prompt always land on the same side. `test_size` is a
        count of distinct prompts, or a fraction of them."""
        keys = sorted({e.key() for e in self.examples},
                      key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
        n = round(test_size * len(keys)) if isinstance(test_size, float) else int(test_size)
        if not 0 <= n <= len(keys):
            raise ValueError(f"test_size {test_size} is not within the {len(keys)} distinct prompts of {self.name}")
        test_keys = set(keys[:n])
        train = [e for e in self.examples if e.key() not in test_keys]
        test = [e for e in self.examples if e.key() in test_keys]
        return replace(self, name=f"{self.name}#train", examples=train), \
            replace(self, name=f"{self.name}#test", examples=test)


# ----------------------------------------------------------------------------------------------------------------
# Spec strings


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"name?key=value&..." -> (name, options); values become int, float, bool, or a tuple for "a,b"."""
    name, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"task spec {spec!r}: option {part!r} needs a value (key=value)")
        key = unquote(key.strip())
        options[key] = unquote(value) if key == "system" else _typed(unquote(value))  # free text, kept whole
    return name.strip(), options


def _typed(value: str) -> Any:
    if "," in value:
        return tuple(_typed(v) for v in value.split(","))
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _with_system(example: Example, system: str) -> Example:
    messages = [m for m in (example.messages or [{"role": "user", "content": example.prompt}]) if m.get("role") != "system"]
    return replace(example, messages=[{"role": "system", "content": system}, *messages])


BUILTIN = ("addition", "arithmetic")
LAYOUTS = ("gsm8k", "math", "aime")  # file readers for the standard layouts of these benchmarks
FILE_PREFIXES = ("file", "jsonl", "json", "parquet", "hf", *LAYOUTS)
DEFAULT = "addition?digits=3"  # the tiny recipe's task


def load(spec: str = DEFAULT) -> Task:
    """Load a task from its spec string (see the module docstring). `heldout=train|test` with `test_size=N`
    (and optionally `split_seed`) keeps one side of `Task.split`, so a train and a test spec that differ only in
    `heldout` never share a problem."""
    name, options = parse_spec(spec)
    system = options.pop("system", None)
    if system is not None:  # every problem asked under this system prompt (splits are by the question alone)
        rest = "&".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options.items())
        task = load(f"{name}?{rest}" if rest else name)
        return replace(task, name=spec, examples=[_with_system(e, system) for e in task.examples])
    side = options.pop("heldout", None)
    test_size, split_seed = options.pop("test_size", None), options.pop("split_seed", 0)
    if side is not None:
        if side not in ("train", "test") or test_size is None:
            raise ValueError(f"task {spec!r}: heldout must be 'train' or 'test', with test_size=N")
        base = "&".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options.items())
        train, test = load(f"{name}?{base}" if base else name).split(test_size, seed=split_seed)
        chosen = train if side == "train" else test
        return replace(chosen, name=spec)
    prefix, sep, rest = name.partition(":")
    if name in BUILTIN:
        from r1kit.tasks import arithmetic

        make, trace = {"addition": (arithmetic.addition, arithmetic.addition_trace),
                       "arithmetic": (arithmetic.arithmetic, arithmetic.arithmetic_trace)}[name]
        try:
            examples = make(**options)
        except TypeError as e:
            raise ValueError(f"task {spec!r}: {e}") from None
        return Task(spec, examples, trace)
    if sep and prefix in ("reasoning-gym", "rg"):
        from r1kit.tasks import gym

        return gym.load(spec, rest, options)
    if sep and prefix in FILE_PREFIXES and len(prefix) > 1:  # (one letter would be a Windows drive)
        from r1kit.tasks import files

        return Task(spec, files.read(rest, layout=prefix if prefix in LAYOUTS else None, **options))
    from pathlib import Path

    if Path(name).exists():
        from r1kit.tasks import files

        return Task(spec, files.read(name, **options))
    raise ValueError(f"unknown task {spec!r}: use one of {list(BUILTIN)}, 'reasoning-gym:NAME', or a path to "
                     f"data (JSONL, Parquet, an HF save_to_disk directory), optionally prefixed by one of "
                     f"{list(LAYOUTS)} for that benchmark's layout; {name!r} is not a file either")
