"""Rewards for reinforcement learning with verifiable rewards, and a way to score them that cannot hang.

The rewards (each returns a float in its documented range, and never raises or hangs on any text):

- `accuracy_reward` in [0, 1] — R1 §2.2.2's rule-based accuracy reward: the answer after the reasoning is checked
  against the gold one. Exact and numeric matches are decided here; math (LaTeX, fractions, sets, intervals,
  percentages) by math-verify; reasoning-gym tasks by the dataset's own `score_answer`.
- `format_reward` in {0, 1} — R1 §2.2.2's format reward: exactly one reasoning block, then a non-empty answer.
- `language_consistency_reward` in [0, 1] — R1 §2.3.3: the proportion of the reasoning's words in the target
  language.
- `overlong_penalty` in [-1, 0] — DAPO §3.4 (eq. 13), soft overlong punishment.
- `length_reward` in [-1, 1] (default bounds) — the cosine length-scaled reward of Yeo et al. 2025 ("Demystifying
  Long Chain-of-Thought Reasoning in LLMs", §4.1): short correct answers earn most, short wrong ones lose most.
- `score(completion, answer, weights)`: a weighted sum of any of them, configured by name
  (`"accuracy=1,format=0.1"`).

Checking a math answer can take unbounded time (sympy will try to expand 9^(9^(9^9)) in C), and math-verify's own
timeout uses SIGALRM, which fails outside the main thread and cannot interrupt C code. So every verification
here runs under a real deadline: in a worker process (`Workers`) that is killed and replaced when it overruns,
and the reward is then 0. `Scorer` scores whole batches in those workers, so rewards never stall generation.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping

from r1kit.tokenizer import END_THINK, THINK, split_reasoning

DEFAULT_TIMEOUT_S = 5.0  # per verification (accuracy_reward) or per completion (Scorer)


# ----------------------------------------------------------------------------------------------------------------
# Running a function under a hard deadline

_IN_WORKER = False  # set in worker processes: they run checks inline, their parent enforces the deadline


def _serve(read_fd: int, write_fd: int) -> None:
    """A worker process's loop: receive (fn, args, kwargs), send back ("ok", result) or ("err", message)."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        import math_verify  # noqa: F401 - warm up before saying ready, so no deadline pays for imports
    except ImportError:
        pass
    # math-verify warns on every call that we disabled its (signal-based) timeouts: we hold the deadline
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            job = inbox.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        try:
            fn, args, kwargs = job
            result = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - anything a check raises becomes the caller's default
            result = ("err", f"{type(e).__name__}: {e}"[:500])
        try:
            outbox.send(result)
        except Exception as e:  # noqa: BLE001 - an unpicklable result
            outbox.send(("err", f"unpicklable result: {type(e).__name__}"))


class WorkerError(RuntimeError):
    """The workers themselves failed (could not start, or were closed): raised, never scored as a wrong answer."""


class _Worker:
    """One worker: a fresh interpreter (not a fork: safe beside threads, and it never re-runs the caller's
    __main__), talking pickles over two pipes."""

    def __init__(self, start_timeout_s: float = 120.0):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # The same import path as ours, so functions and objects pickled here unpickle there
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        code = f"import r1kit.rewards as r; r._serve({to_child_r}, {from_child_w})"
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w),
                                            env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.inbox = Connection(from_child_r, writable=False)
        self.outbox = Connection(to_child_w, readable=False)
        try:
            if not self.inbox.poll(start_timeout_s):
                raise WorkerError(f"a reward worker did not start within {start_timeout_s:.0f} s")
            self.inbox.recv()  # ("ready", pid)
        except (EOFError, OSError):
            self.kill()
            raise WorkerError("a reward worker exited while starting (its error is on stderr)") from None
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.inbox.close()
        self.outbox.close()

    def stop(self) -> None:
        try:
            self.outbox.send(None)
            self.process.wait(timeout=2)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.inbox.close()
        self.outbox.close()


class Workers:
    """Worker processes that run a function under a hard deadline; thread-safe.

    `call(fn, *args, timeout_s=..., default=...)` runs `fn` (a module-level, picklable function) in an idle worker
    and returns its result, or `default` when it raised, overran the deadline (the worker is killed; a new one
    starts when next needed, in about a second) or died. Workers start on demand, up to `max_workers`.
    """

    def __init__(self, max_workers: int = 2):
        self.max_workers = max(1, int(max_workers))
        self.timeouts = 0  # counters, for metrics
        self.errors = 0
        self._idle: list[_Worker] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._closed = False

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise WorkerError("these Workers are closed")
                if self._idle:
                    self._busy += 1
                    return self._idle.pop()
                if self._busy < self.max_workers:
                    self._busy += 1
                    break
                self._cond.wait()
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, ok: bool) -> None:
        if not ok:
            worker.kill()
        with self._cond:
            self._busy -= 1
            if ok and not self._closed:
                self._idle.append(worker)
                worker = None
            self._cond.notify()
        if ok and worker is not None:  # closed while this one was busy
            worker.stop()

    def _count(self, name: str) -> None:
        with self._cond:
            setattr(self, name, getattr(self, name) + 1)

    def call(self, fn: Callable, *args, timeout_s: float = DEFAULT_TIMEOUT_S, default: Any = None, **kwargs):
        try:
            job = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - arguments that cannot cross a process boundary: check them here
            return _inline_with_deadline(fn, args, kwargs, timeout_s, default)
        worker = self._acquire()
        ok = False
        try:
            worker.outbox.send_bytes(job)
            if not worker.inbox.poll(timeout_s):
                self._count("timeouts")
                return default
            status, value = worker.inbox.recv()
            ok = True
            if status != "ok":
                self._count("errors")
                return default
            return value
        except (EOFError, OSError):  # the worker died (out of memory, a crash in C)
            self._count("errors")
            return default
        finally:
            self._release(worker, ok)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.stop()

    def pids(self) -> list[int]:
        """Process ids of the idle workers."""
        with self._cond:
            return [w.pid for w in self._idle]


class _Deadline(BaseException):
    pass


def _inline_with_deadline(fn, args, kwargs, timeout_s, default):
    # In this process (inside a worker, or for arguments that cannot be pickled): on the main thread SIGALRM
    # interrupts Python code (C code only a kill can stop: a worker's parent holds that deadline); elsewhere a
    # helper thread is waited for and abandoned if it overruns, so the caller still gets `default` on time.
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def _alarm(signum, frame):
            raise _Deadline()

        previous = signal.signal(signal.SIGALRM, _alarm)

        def _disarm():
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3))
                return fn(*args, **kwargs)
            finally:
                _disarm()
        except _Deadline:  # (also when the alarm lands inside the finally: disarm again, fully)
            _disarm()
            return default
        except Exception:  # noqa: BLE001
            return default
    box = [default]

    def _run():
        try:
            box[0] = fn(*args, **kwargs)
        except BaseException:  # noqa: BLE001
            pass

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return default if thread.is_alive() else box[0]


_SHARED: Workers | None = None
_SHARED_LOCK = threading.Lock()


def shared_workers() -> Workers:
    """The process-wide Workers that `accuracy_reward` uses (closed at exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED._closed:
            _SHARED = Workers(max_workers=max(2, os.cpu_count() or 2))
        return _SHARED


@atexit.register
def _close_shared() -> None:
    if _SHARED is not None:
        _SHARED.close()


def run_with_deadline(fn: Callable, *args, timeout_s: float = DEFAULT_TIMEOUT_S, default: Any = None, **kwargs):
    """`fn(*args, **kwargs)`, or `default` if it raises or has not returned within `timeout_s` seconds."""
    if _IN_WORKER:  # already in a killable worker: a cheap alarm here, the parent's kill as the backstop
        return _inline_with_deadline(fn, args, kwargs, timeout_s, default)
    return shared_workers().call(fn, *args, timeout_s=timeout_s, default=default, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Answers: extraction and normalization


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance, or None."""
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not opens:
        return None
    # match every brace in one pass (a box per unbalanced candidate would make this quadratic)
    closing, stack = {}, []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    for start in reversed(opens):
        if start in closing:
            return text[start + 1: closing[start]]
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|operatorname)\s*\{([^{}]*)\}")


def _normalize_text(s: str) -> str:
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("$", "").replace("\\", " ")
    s = re.sub(r"\s+", " ", s).strip()
    return s.removesuffix(".").rstrip().casefold()


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d{1,4})?")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """A plain number written in `s` (with thousands separators, currency, %), and whether it was a percentage."""
    s = s.strip()
    if len(s) > 200:
        return None
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    for a, b in (("\u2212", "-"), ("{,}", ","), ("\\,", ""), ("\\!", ""), ("~", ""), ("\\$", ""), ("$", ""),
                 ("\\%", "%")):
        s = s.replace(a, b)
    s = re.sub(r"\s+%", "%", s.strip()).removesuffix(".")
    percent = s.endswith("%")
    s = s.removesuffix("%")
    if not s or not any(c.isdigit() for c in s) or not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", "")), percent
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    # A percentage matches both its number and its fraction (50% is 50 and 0.5), as graders of MATH do.
    va = {a[0], a[0] / 100} if a[1] else {a[0]}
    vb = {b[0], b[0] / 100} if b[1] else {b[0]}
    return any(abs(x - y) <= Fraction(1, 10**6) * max(abs(x), abs(y), Fraction(1, 1000)) for x in va for y in vb)


_LETTER = re.compile(r"\(?([A-Z])\)?")


def _as_letter(s: str) -> str | None:
    s = _TEXT_WRAPPERS.sub(r"\1", s.strip().replace("$", "")).strip().rstrip(".")
    m = _LETTER.fullmatch(s)
    return m.group(1) if m else None


def _find_letter(answer: str) -> str | None:
    boxed = last_boxed(answer)
    candidates = [boxed] if boxed is not None else []
    candidates.append(answer)
    for c in candidates:
        letter = _as_letter(c)
        if letter:
            return letter
    m = re.search(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", answer)
    if m:
        return m.group(1)
    m = re.match(r"\s*\(?([A-Z])[).:](?:\s|$)", answer)
    return m.group(1) if m else None


_COMMANDS = re.compile(r"\\[A-Za-z]+")


def _is_word_answer(gold: str) -> bool:
    # "Monday", "yes", "blue": math-verify would read them as products of symbols (so an anagram would match)
    s = _COMMANDS.sub(" ", gold)
    return not any(c.isdigit() for c in s) and re.search(r"[^\W\d_]{2,}", s) is not None


def _has_words(s: str) -> bool:
    return re.search(r"[^\W\d_]{2,}", _COMMANDS.sub(" ", s)) is not None


def _math_verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # Bare LaTeX is only read inside delimiters: a gold of "\{1,2\}" or "(0,1)" parses to nothing otherwise.
    gold_text = gold if ("\\boxed" in gold or "$" in gold) else "\\boxed{" + gold + "}"
    boxed = last_boxed(pred)
    if boxed is not None:  # the last boxed answer only: several would be read as a set
        pred_text = "\\boxed{" + boxed + "}"
    elif not _has_words(pred) and len(pred) < 500:
        pred_text = "\\boxed{" + pred.replace("$", "") + "}"
    else:  # prose: let math-verify find the answer in it
        pred_text = pred
    g = parse(gold_text, parsing_timeout=None)
    p = parse(pred_text, parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


def _reasoning_gym_score(pred: str, name: str, config: Mapping, entry: Mapping) -> float:
    dataset = _rg_dataset(name, tuple(sorted((k, repr(v)) for k, v in config.items())), config)
    return dataset.score_answer(pred, entry)


_RG_CACHE: dict = {}


def _rg_dataset(name: str, key: tuple, config: Mapping):
    if (name, key) not in _RG_CACHE:
        import reasoning_gym

        try:
            _RG_CACHE[(name, key)] = reasoning_gym.create_dataset(name, size=1, seed=0, **dict(config))
        except Exception:  # noqa: BLE001 - scoring needs no generation; the default config scores as well
            scorer = reasoning_gym.get_score_answer_fn(name)
            _RG_CACHE[(name, key)] = type("Scorer", (), {"score_answer": staticmethod(scorer)})
    return _RG_CACHE[(name, key)]


def _verify(pred: str, gold: str, scorer: str, meta: Mapping) -> float:
    """The slow checks, run under a deadline: math-verify, or a reasoning-gym dataset's own scorer."""
    if scorer == "reasoning-gym":
        boxed = last_boxed(pred)
        value = _reasoning_gym_score(boxed.strip() if boxed is not None else pred, meta["dataset"],
                                     meta.get("config", {}), meta["entry"])
        return _clip(value, 0.0, 1.0)
    return 1.0 if _math_verify(pred, gold) else 0.0


def _gold(answer: Any) -> tuple[str, str, Mapping]:
    # A gold answer is a string, or anything with .answer (and optionally .scorer and .meta): a tasks.Example
    if isinstance(answer, str):
        return answer, "math", {}
    if isinstance(answer, Mapping):
        return str(answer.get("answer", "")), str(answer.get("scorer", "math")), answer.get("meta", {}) or {}
    gold = getattr(answer, "answer", None)
    return ("" if gold is None else str(gold)), str(getattr(answer, "scorer", "math")), \
        getattr(answer, "meta", {}) or {}


def check_answer(pred: str, answer: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """Score an already extracted answer `pred` against a gold `answer` (a string or a tasks.Example), in [0, 1].

    Scorers: "math" (the default: exact text, then numbers, then multiple-choice letters, then math-verify),
    "exact" (normalized text only) and "reasoning-gym" (the dataset's own `score_answer`).
    """
    try:
        if not isinstance(pred, str):
            return 0.0
        gold, scorer, meta = _gold(answer)
        if scorer == "reasoning-gym":
            return _clip(run_with_deadline(_verify, pred, gold, scorer, meta, timeout_s=timeout_s, default=0.0),
                         0.0, 1.0)
        if not pred.strip() or not gold.strip():
            return 0.0
        if _normalize_text(pred) == _normalize_text(gold):
            return 1.0
        if scorer == "exact" or _is_word_answer(gold):
            return 0.0
        letter = _as_letter(last_boxed(gold) or gold)
        if letter is not None:
            return 1.0 if _find_letter(pred) == letter else 0.0
        g, p = _as_number(gold), _as_number(pred)
        if g is not None and p is not None:
            return 1.0 if _numbers_equal(g, p) else 0.0
        return _clip(run_with_deadline(_verify, pred, gold, "math", {}, timeout_s=timeout_s, default=0.0), 0.0, 1.0)
    except WorkerError:  # broken machinery must not pass for wrong answers
        raise
    except Exception:  # noqa: BLE001 - a reward never raises on its input
        return 0.0


def _clip(x: Any, lo: float, hi: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0 if lo <= 0.0 <= hi else lo
    if not math.isfinite(x):
        return 0.0 if lo <= 0.0 <= hi else lo
    return min(hi, max(lo, x))


def normalize_answer(answer: str) -> str:
    """A canonical key for an extracted answer, so equal answers written differently vote together
    (`\\boxed{1/2}`, `0.5` and `$0.5$` share a key; text answers are case- and space-folded)."""
    if not isinstance(answer, str):
        return ""
    text = _normalize_text(answer)
    number = _as_number(text)
    if number is not None:
        value, percent = number
        return f"{value.numerator}/{value.denominator}" + ("%" if percent else "")
    return text


# ----------------------------------------------------------------------------------------------------------------
# The rewards


def accuracy_reward(completion: str, answer: Any, *, prefilled: bool = False,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the completion's answer (what follows its reasoning) matches `answer`, else 0.0; in [0, 1].

    `answer` is the gold answer string, or a tasks.Example (whose `scorer` may be a reasoning-gym dataset's, which
    can give partial credit). Only the answer is read, never the reasoning: a completion must not be paid for a
    number it merely mentioned while thinking. `prefilled`: the prompt opened the think block, so a completion
    with no tags at all is unfinished reasoning, not an answer.
    """
    if not isinstance(completion, str):
        return 0.0
    _, pred = split_reasoning(completion, prefilled=prefilled)
    return check_answer(pred, answer, timeout_s=timeout_s)


def format_reward(completion: str) -> float:
    """1.0 for exactly one non-empty reasoning block followed by a non-empty answer, else 0.0.

    The block is `<think> ... </think>`, or `... </think>` alone when the chat template pre-filled `<think>`.
    Nothing but whitespace may precede it. An answer in `<answer>` tags (R1-Zero) needs exactly one non-empty pair
    and nothing after it.
    """
    if not isinstance(completion, str):
        return 0.0
    text = completion.strip()
    if text.count(END_THINK) != 1 or text.count(THINK) > 1:
        return 0.0
    if THINK in text and not text.startswith(THINK):
        return 0.0
    reasoning, _, answer = text.removeprefix(THINK).partition(END_THINK)
    answer = answer.strip()
    if not reasoning.strip() or not answer:
        return 0.0
    if "<answer>" in answer or "</answer>" in answer:
        if answer.count("<answer>") != 1 or answer.count("</answer>") != 1:
            return 0.0
        if not (answer.startswith("<answer>") and answer.endswith("</answer>")):
            return 0.0
        if not answer[len("<answer>"): -len("</answer>")].strip():
            return 0.0
    return 1.0


# Script of a language's words. Languages written without spaces count each character as a word.
_LANGUAGE_SCRIPTS = {
    "en": "LATIN", "fr": "LATIN", "de": "LATIN", "es": "LATIN", "it": "LATIN", "pt": "LATIN", "nl": "LATIN",
    "vi": "LATIN", "id": "LATIN", "tr": "LATIN", "pl": "LATIN", "ru": "CYRILLIC", "uk": "CYRILLIC",
    "el": "GREEK", "ar": "ARABIC", "he": "HEBREW", "hi": "DEVANAGARI", "th": "THAI", "ko": "HANGUL",
    "zh": "CJK", "ja": ("CJK", "HIRAGANA", "KATAKANA"),
}
_CHARACTER_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


def language_consistency_reward(completion: str, language: str = "en", *, prefilled: bool = False) -> float:
    """The proportion of the reasoning's words written in `language`'s script (R1 §2.3.3), in [0, 1].

    The reasoning is the think block (the whole text if there is none). Numbers and symbols are not words; a
    text with no words scores 0. Supported: the keys of `_LANGUAGE_SCRIPTS` (ISO 639-1 codes).
    """
    if not isinstance(completion, str):
        return 0.0
    target = _LANGUAGE_SCRIPTS.get(str(language).lower().split("-")[0])
    if target is None:
        raise ValueError(f"language {language!r} is not supported; choose one of {sorted(_LANGUAGE_SCRIPTS)}")
    targets = (target,) if isinstance(target, str) else target
    reasoning, answer = split_reasoning(completion, prefilled=prefilled)
    text = reasoning or answer
    characters = _CHARACTER_WORDS.findall(text)
    words = re.findall(r"[^\W\d_]+", _CHARACTER_WORDS.sub(" ", text))
    total = len(characters) + len(words)
    if total == 0:
        return 0.0
    hits = sum(_script(w[0]) in targets for w in words) + sum(_script(c) in targets for c in characters)
    return hits / total


def overlong_penalty(num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong punishment (§3.4, eq. 13), in [-1, 0].

    0 up to `max_tokens - cache_tokens`, then falling linearly to -1 at `max_tokens`, and -1 beyond: a long answer
    is penalized gradually instead of all at once at the truncation point.
    """
    if not (0 < cache_tokens <= max_tokens):
        raise ValueError(f"need 0 < cache_tokens <= max_tokens, got cache_tokens={cache_tokens}, "
                         f"max_tokens={max_tokens}")
    n = int(num_tokens)
    if n <= max_tokens - cache_tokens:
        return 0.0
    if n <= max_tokens:
        return ((max_tokens - cache_tokens) - n) / cache_tokens
    return -1.0


def length_reward(num_tokens: int, max_tokens: int, correct: bool, *, min_correct: float = 0.5,
                  max_correct: float = 1.0, min_wrong: float = -1.0, max_wrong: float = -0.5) -> float:
    """Cosine length-scaled reward (Yeo et al. 2025, §4.1), in [min_wrong, max_correct].

    Along a half cosine over [0, max_tokens]: a correct answer earns `max_correct` when short, falling to
    `min_correct` at the budget; a wrong one earns `min_wrong` when short, rising to `max_wrong` at the budget
    (thinking longer when wrong is encouraged). Lengths past the budget count as the budget.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    progress = min(max(int(num_tokens), 0), max_tokens) / max_tokens
    cosine = math.cos(progress * math.pi)
    if correct:
        return min_correct + 0.5 * (max_correct - min_correct) * (1.0 + cosine)
    return max_wrong + 0.5 * (min_wrong - max_wrong) * (1.0 + cosine)


# ----------------------------------------------------------------------------------------------------------------
# Weighted sums by name

# name -> (range, options it needs)
REWARDS: dict[str, tuple[tuple[float, float], tuple[str, ...]]] = {
    "accuracy": ((0.0, 1.0), ()),
    "format": ((0.0, 1.0), ()),
    "language": ((0.0, 1.0), ()),
    "overlong": ((-1.0, 0.0), ("num_tokens", "max_tokens", "cache_tokens")),
    "length": ((-1.0, 1.0), ("num_tokens", "max_tokens")),
}


def parse_weights(weights: str | Mapping[str, float]) -> dict[str, float]:
    """`"accuracy=1,format=0.1"` (a bare name weighs 1) or a mapping -> {name: weight}, validated."""
    if isinstance(weights, str):
        out = {}
        for part in filter(None, (p.strip() for p in weights.split(","))):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = float(value) if value.strip() else 1.0
            except ValueError:
                raise ValueError(f"reward weight {part!r}: {value!r} is not a number") from None
    else:
        out = {str(k): float(v) for k, v in dict(weights).items()}
    unknown = sorted(set(out) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; choose from {sorted(REWARDS)}")
    if not out:
        raise ValueError(f"no rewards given; choose from {sorted(REWARDS)}")
    return out


def _check_options(weights: Mapping[str, float], options: Mapping[str, Any]) -> None:
    for name in weights:
        missing = [o for o in REWARDS[name][1] if options.get(o) is None]
        if missing:
            raise ValueError(f"reward {name!r} needs {missing}")
    if "overlong" in weights and not 0 < options["cache_tokens"] <= options["max_tokens"]:
        raise ValueError("reward 'overlong' needs 0 < cache_tokens <= max_tokens")
    if "language" in weights:
        language_consistency_reward("", options.get("language", "en"))  # raises for an unknown language


def _score_parts(completion: str, answer: Any, weights: Mapping[str, float], options: Mapping[str, Any]):
    prefilled = bool(options.get("prefilled", False))
    timeout_s = float(options.get("timeout_s", DEFAULT_TIMEOUT_S))
    parts: dict[str, float] = {}
    accuracy = None
    for name in weights:
        try:
            if name in ("accuracy", "length") and accuracy is None:
                accuracy = accuracy_reward(completion, answer, prefilled=prefilled, timeout_s=timeout_s)
            if name == "accuracy":
                value = accuracy
            elif name == "format":
                value = format_reward(completion)
            elif name == "language":
                value = language_consistency_reward(completion, options.get("language", "en"), prefilled=prefilled)
            elif name == "overlong":
                value = overlong_penalty(options["num_tokens"], options["max_tokens"], options["cache_tokens"])
            else:
                value = length_reward(options["num_tokens"], options["max_tokens"], accuracy >= 1.0)
        except WorkerError:
            raise
        except Exception:  # noqa: BLE001 - a reward never raises on its input
            value = 0.0
        parts[name] = _clip(value, *REWARDS[name][0])
    parts["reward"] = sum(weights[n] * parts[n] for n in weights)
    return parts


def score(completion: str, answer: Any = None, weights: str | Mapping[str, float] = "accuracy=1,format=0.1",
          **options) -> dict[str, float]:
    """Each named reward of one completion and their weighted sum under "reward".

    Options: `prefilled`, `timeout_s`, `language` (for "language"), `num_tokens` and `max_tokens` (for "length"
    and "overlong"), `cache_tokens` (for "overlong"). A configuration error raises; the completion never does.
    """
    weights = parse_weights(weights)
    _check_options(weights, options)
    return _score_parts(completion, answer, weights, options)


class Scorer:
    """Scores batches of completions in worker processes, each under a deadline, without blocking the caller.

    `submit(completions, answers, num_tokens=None)` returns a Future of one `score()` dict per completion
    (`score(...)` is the blocking form). A check that overruns `timeout_s` scores 0; a completion whose worker is
    still busy at 1.5 * timeout_s + 1 s (stuck in C code) is killed, replaced, and gets 0 for every reward.
    Options are those of `score()`. Use as a context manager, or call `close()`.
    """

    def __init__(self, weights: str | Mapping[str, float] = "accuracy=1,format=0.1", *, num_workers: int = 2,
                 timeout_s: float = DEFAULT_TIMEOUT_S, **options):
        self.weights = parse_weights(weights)
        self.options = {**options, "timeout_s": timeout_s}
        self.timeout_s = timeout_s
        self.workers = Workers(max_workers=num_workers)
        self._threads = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="r1kit-scorer")
        self._batches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1kit-scorer-batch")

    def _one(self, completion: str, answer: Any, num_tokens: int | None) -> dict[str, float]:
        options = dict(self.options, num_tokens=num_tokens)
        default = {**{n: 0.0 for n in self.weights}, "reward": 0.0}
        # Leave the worker's own checks room to finish before the worker is killed.
        return self.workers.call(_score_parts, completion, answer, self.weights, options,
                                 timeout_s=self.timeout_s * 1.5 + 1.0, default=default)

    def score(self, completions: list[str], answers: list[Any], num_tokens: list[int] | None = None):
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        lengths = list(num_tokens) if num_tokens is not None else [None] * len(completions)
        _check_options(self.weights, {**self.options, "num_tokens": 0 if num_tokens is not None else None})
        return list(self._threads.map(self._one, completions, answers, lengths))

    def submit(self, completions: list[str], answers: list[Any], num_tokens: list[int] | None = None) -> Future:
        return self._batches.submit(self.score, list(completions), list(answers), num_tokens)

    def close(self) -> None:
        self._batches.shutdown(wait=True)
        self._threads.shutdown(wait=True)
        self.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
