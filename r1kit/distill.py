"""Distillation data from a teacher: any OpenAI-compatible endpoint (`r1kit serve`, vLLM, SGLang, DeepSeek's
API) or an r1kit checkpoint, over a task's prompts (R1 §2.4: the students learn from the teacher's samples).

    r1kit distill --task data/train.jsonl --teacher-url http://localhost:8000/v1 --teacher-model deepseek-reasoner \\
        --samples 4 --concurrency 16 --output runs/distill/data.jsonl      # key from $OPENAI_API_KEY, if needed
    r1kit sft --model ./my-qwen2 --data runs/distill/data.jsonl --output-dir runs/student

Each sample is one request. Its assistant turn carries the teacher's reasoning (the message's `reasoning_content`,
or the text of a `<think>` block) and its answer; the task's reward decides whether it is kept (`reject`). Kept
samples go to OUTPUT and the rest to its `.rejected.jsonl` twin, one line a sample, each line written whole by one
append and fsynced. A rerun reads both files and asks only for what is missing, so a crash loses no sample and
asks for none twice. Connection errors, 429 and 5xx answers are retried with jittered exponential back-off (a
Retry-After header wins); a refused key, an unknown model or a rejected request stops the job with the server's
own words.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from r1kit.config import ConfigError
from r1kit.train import TrainingError


class DistillError(TrainingError):
    """The teacher cannot be used (refused key, unknown model, bad request) or requests kept failing."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class DistillConfig:
    task: str = ""  # prompts with verifiable answers: a task spec or a data file (docs/DATA.md)
    output: str = "runs/distill/data.jsonl"  # kept samples: JSONL of {"id", "messages"}, ready for r1kit sft
    teacher: str = ""  # an r1kit checkpoint directory to sample from, instead of --teacher-url
    teacher_url: str = ""  # an OpenAI-compatible API's base URL, e.g. http://127.0.0.1:8000/v1
    teacher_model: str = ""  # the model name to ask for (default: the first one the endpoint lists)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the endpoint's key (unset: no key)
    samples: int = 1  # teacher answers per prompt
    limit: int = 0  # at most this many prompts (0: all)
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 0  # per answer, reasoning included; 0: as many as the context holds (the server's default)
    chat_template: str = ""  # an r1kit teacher's prompt format (r1, r1-zero; default: its tokenizer's own)
    reject: bool = True  # keep only answers that are correct (the task's reward) after a non-empty reasoning
    concurrency: int = 8  # requests in flight
    max_retries: int = 6  # per request, on connection errors, 429 and 5xx
    backoff_s: float = 1.0  # the first retry's wait, doubled at each retry and jittered
    timeout_s: float = 600.0  # per request
    seed: int = 0

    def validate(self) -> None:
        if not self.task:
            raise ConfigError("task: give the prompts to distil on (a task spec or a data file)")
        if bool(self.teacher) == bool(self.teacher_url):
            raise ConfigError("give exactly one teacher: --teacher CHECKPOINT or --teacher-url URL")
        for name in ("samples", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("limit", "max_retries", "backoff_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.max_tokens < 0 or self.timeout_s <= 0:
            raise ConfigError("max_tokens must be >= 0 and timeout_s positive")
        if self.teacher_url and not self.teacher_url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher_url={self.teacher_url!r}: expected http://HOST[:PORT]/v1 or https://...")


# ------------------------------------------------------------------------------------------------ the output files
def rejected_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejected.jsonl")


def _done_ids(path: Path) -> set[str]:
    """Ids already written to `path`. A torn last line (a crash in mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    ids = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DistillError(f"{path}:{n}: not a distillation sample (a JSON object with an 'id'); move the file "
                               f"away or repair that line") from None
    return ids


class _Appender:
    """One JSON object a line, each line one write() on an O_APPEND descriptor, fsynced."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def write(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------------------ the teachers
class EndpointTeacher:
    """An OpenAI-compatible chat endpoint: one request a sample, retried on transient failures."""

    def __init__(self, cfg: DistillConfig):
        import httpx

        self.cfg = cfg
        self.url = cfg.teacher_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=cfg.timeout_s)
        self.model = cfg.teacher_model or self._first_model()

    def _first_model(self) -> str:
        data = self._call("GET", "/models", None)
        models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if not models:
            raise DistillError(f"{self.url}/models lists no model; give --teacher-model")
        return models[0]

    def ask(self, messages: list[dict], seed: int) -> dict:
        c = self.cfg
        body = {"model": self.model, "messages": messages, "temperature": c.temperature, "top_p": c.top_p,
                "seed": seed, **({"max_tokens": c.max_tokens} if c.max_tokens else {})}
        data = self._call("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise DistillError(f"{self.url}/chat/completions: not a chat completion: {str(data)[:300]}") from None
        reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
        return {"reasoning": reasoning, "content": msg.get("content") or "",
                "finish_reason": choice.get("finish_reason"),
                "completion_tokens": (data.get("usage") or {}).get("completion_tokens")}

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        c = self.cfg
        for attempt in range(c.max_retries + 1):
            try:
                return self._once(method, path, body)
            except _Retryable as e:
                if attempt == c.max_retries:
                    raise DistillError(f"{self.url}{path}: still failing after {c.max_retries} retries: {e}") from None
                wait_s = e.retry_after if e.retry_after is not None else \
                    c.backoff_s * 2**attempt * (0.5 + random.random())
                time.sleep(min(wait_s, 120.0))
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: dict | None) -> dict:
        import httpx

        try:
            r = self.client.request(method, self.url + path, json=body)
        except httpx.HTTPError as e:  # refused, reset, timed out
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        if r.status_code == 429 or r.status_code >= 500:
            after = r.headers.get("retry-after")
            raise _Retryable(f"HTTP {r.status_code}: {r.text[:200]}",
                             float(after) if after and after.replace(".", "", 1).isdigit() else None)
        if r.status_code in (401, 403):
            state = "set" if os.environ.get(self.cfg.api_key_env) else "unset"
            raise DistillError(f"{self.url}{path}: HTTP {r.status_code}, the endpoint refused the key "
                               f"(${self.cfg.api_key_env} is {state}): {r.text[:300]}")
        if r.status_code >= 400:
            raise DistillError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError:
            raise _Retryable(f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]}") from None

    def close(self) -> None:
        self.client.close()


class CheckpointTeacher:
    """An r1kit checkpoint sampled by the engine, a batch of requests at a time."""

    def __init__(self, cfg: DistillConfig):
        from r1kit.engine import LLM

        self.cfg = cfg
        self.llm = LLM(cfg.teacher, max_num_seqs=64)
        if self.llm.tokenizer is None:
            raise ConfigError(f"teacher={cfg.teacher!r}: the checkpoint has no tokenizer.json")
        self.model = str(cfg.teacher)

    def ask_many(self, jobs: list[tuple[list[dict], int]]) -> list[dict]:
        from r1kit.engine import SamplingParams
        from r1kit.tokenizer import split_reasoning

        c, tok = self.cfg, self.llm.tokenizer
        prompts = [tok.apply_chat_template(m, add_generation_prompt=True, chat_template=c.chat_template or None)
                   for m, _ in jobs]
        params = [SamplingParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens or None, seed=s)
                  for _, s in jobs]
        out = []
        for prompt, r in zip(prompts, self.llm.generate(prompts, params)):
            o = r.outputs[0]
            reasoning, content = split_reasoning(o.text, prefilled=prompt.rstrip().endswith("<think>"))
            out.append({"reasoning": reasoning, "content": content, "finish_reason": o.finish_reason,
                        "completion_tokens": len(o.token_ids)})
        return out

    def close(self) -> None:
        self.llm = None  # the engine's preallocated cache goes with it


# ------------------------------------------------------------------------------------------------ the job
def sample_id(example, j: int) -> str:
    """Stable across reruns and reorderings: what the example asks, and which of its samples this is."""
    return hashlib.sha256(example.key().encode()).hexdigest()[:16] + f"-{j}"


def judge(answer: dict, example, reject: bool) -> str | None:
    """Why a teacher answer is not kept, or None to keep it."""
    from r1kit.rewards import accuracy_reward, format_reward
    from r1kit.tokenizer import split_reasoning

    reasoning, content = answer["reasoning"], answer["content"]
    if not reasoning and "</think>" in content:  # the reasoning inline, in a <think> block
        reasoning, content = split_reasoning(content)
        answer["reasoning"], answer["content"] = reasoning, content
    answer["reasoning"], answer["content"] = reasoning.strip(), content.strip()
    if not reject:
        return None
    if answer["finish_reason"] == "length":
        return "truncated"
    completion = f"<think>\n{answer['reasoning']}\n</think>\n{answer['content']}"
    if format_reward(completion) < 1:
        return "no reasoning or no answer"
    if accuracy_reward(completion, example) < 1:
        return "wrong answer"
    return None


def distill(config: DistillConfig | dict | None = None, *, progress: bool = True, **overrides) -> dict:
    """Ask the teacher for every missing sample; returns counts and the two output paths."""
    from r1kit import tasks
    from r1kit.train import make_config

    if isinstance(config, dict):
        config, overrides = None, {**config, **overrides}
    cfg = make_config(DistillConfig, config, **overrides)
    task = tasks.load(cfg.task)
    examples = list(task)[: cfg.limit or None]
    out, rej = Path(cfg.output), rejected_path(cfg.output)
    done = _done_ids(out) | _done_ids(rej)
    jobs = [(ex, sid) for ex in examples for j in range(cfg.samples) if (sid := sample_id(ex, j)) not in done]
    t0 = time.perf_counter()
    stats = {"output": str(out), "rejected_output": str(rej), "prompts": len(examples),
             "already_done": cfg.samples * len(examples) - len(jobs), "asked": 0, "kept": 0, "rejected": 0,
             "completion_tokens": 0}
    teacher = CheckpointTeacher(cfg) if cfg.teacher else EndpointTeacher(cfg)
    kept_f, rej_f = _Appender(out), _Appender(rej)
    bar = _Progress(len(jobs), progress)

    def record(ex, sid: str, answer: dict) -> None:
        why = judge(answer, ex, cfg.reject)
        row = {"id": sid, "messages": ex.chat() + [{"role": "assistant", "reasoning_content": answer["reasoning"],
                                                    "content": answer["content"]}],
               "answer": ex.answer, "teacher": teacher.model}
        if why is None:
            kept_f.write(row)
            stats["kept"] += 1
        else:
            rej_f.write({**row, "rejected": why})
            stats["rejected"] += 1
        stats["asked"] += 1
        stats["completion_tokens"] += answer.get("completion_tokens") or 0
        bar.advance(stats)

    seed = lambda sid: (cfg.seed * 1_000_003 + int(sid[:8], 16) + int(sid.rpartition("-")[2])) % 2**31  # noqa: E731
    try:
        if isinstance(teacher, CheckpointTeacher):
            for i in range(0, len(jobs), 64):
                chunk = jobs[i : i + 64]
                answers = teacher.ask_many([(ex.chat(), seed(sid)) for ex, sid in chunk])
                for (ex, sid), answer in zip(chunk, answers):
                    record(ex, sid, answer)
        else:
            with ThreadPoolExecutor(cfg.concurrency) as pool:
                pending, todo = {}, iter(jobs)
                try:
                    while True:
                        while len(pending) < cfg.concurrency and (job := next(todo, None)) is not None:
                            ex, sid = job
                            pending[pool.submit(teacher.ask, ex.chat(), seed(sid))] = job
                        if not pending:
                            break
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            record(*pending.pop(f), f.result())  # a DistillError stops the job here
                finally:
                    for f in pending:
                        f.cancel()
    finally:
        bar.close()
        kept_f.close()
        rej_f.close()
        teacher.close()
    stats["elapsed_s"] = time.perf_counter() - t0
    stats["config"] = asdict(cfg)
    return stats


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(*Progress.get_default_columns(), "{task.fields[info]}",
                                console=Console(stderr=True))  # stdout is for the result
            self.task = self.bar.add_task("distill", total=total, info="")
            self.bar.start()

    def advance(self, stats: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"kept {stats['kept']} / {stats['asked']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
