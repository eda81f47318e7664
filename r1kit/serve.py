"""`r1kit serve`: an OpenAI- and DeepSeek-compatible HTTP server, with a chat page that shows the thinking.

    r1kit serve DIR --host 127.0.0.1 --port 8000 [--api-key KEY]      # or R1KIT_API_KEY in the environment

What it implements, on r1kit's engine (continuous batching, prefix caching):

- OpenAI's API (platform.openai.com/docs/api-reference): `GET /v1/models`, `POST /v1/chat/completions` and
  the legacy `POST /v1/completions`, streamed as server-sent events or not, with OpenAI's parameter names, its
  error object `{"error": {"message", "type", "param", "code"}}` and its status codes (400, 401, 404, 408, 429).
- DeepSeek's reasoning API (api-docs.deepseek.com/guides/reasoning_model): the thinking in
  `message.reasoning_content`, the answer in `message.content`; streamed deltas carry `reasoning_content` until
  the model closes its think block, then `content`. Each also under `reasoning`, the name newer vLLM clients read.
  `reasoning_content` sent back in input messages is dropped, as R1 advises (the template never shows old
  reasoning). The R1 template pre-fills "<think>\\n", so a completion starts inside its reasoning.
- DeepSeek's usage accounting: `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` from the engine's prefix
  cache, `completion_tokens_details.reasoning_tokens`, and the request's `cost` in USD from a price table (by
  default DeepSeek-R1's list prices per million tokens: $0.55 input on a cache miss, $0.14 on a hit, $2.19 output).
- vLLM's sampling extensions beside OpenAI's: `top_k`, `min_p`, `min_tokens`, `ignore_eos`.
- Operations: `GET /health`, `GET /metrics` (Prometheus); an optional API key compared in constant time and
  never logged; prompts longer than the context refused with the numbers; a bounded queue (429 with
  Retry-After); a per-request timeout; a client that disconnects frees its slots at once; SIGTERM finishes the
  requests in flight, then exits (uvicorn's graceful shutdown); binds 127.0.0.1 unless told otherwise.
- The chat page at `/` (r1kit/web/: static HTML, JS and CSS, no CDN, so it works offline).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1kit.engine import AsyncEngine, Engine, RequestError, RequestOutput, SamplingParams
from r1kit.tokenizer import END_THINK, THINK

log = logging.getLogger("r1kit.serve")
WEB_DIR = Path(__file__).parent / "web"
API_KEY_ENV = "R1KIT_API_KEY"
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM's floor


@dataclass(frozen=True)
class Prices:
    """USD per million tokens. Defaults: DeepSeek-R1's list prices (api-docs.deepseek.com/quick_start/pricing)."""

    input_cache_miss: float = 0.55
    input_cache_hit: float = 0.14
    output: float = 2.19

    def cost(self, cache_miss: int, cache_hit: int, output: int) -> float:
        return (cache_miss * self.input_cache_miss + cache_hit * self.input_cache_hit + output * self.output) / 1e6


# ------------------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    # Wrong types are errors (no "0.5" -> 0.5 coercion), unknown fields are ignored, as OpenAI's API does.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # `reasoning_content` / `reasoning` are accepted and dropped (unknown fields are ignored): R1 advises not to
    # feed a model its old reasoning, and its template would drop it anyway.

    def for_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(0, ge=0)
    ignore_eos: bool | None = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=5)


_FIELDS = {name for m in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
           for name in m.model_fields}


# --------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error with OpenAI's shape: {"error": {"message", "type", "param", "code"}} and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII-escaped, so an echoed parameter holding a lone surrogate cannot break the encoding
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names parameters: ("body", "messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out or None


# ---------------------------------------------------------------------------------------- streaming text
def _partial_suffix(text: str, needles: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a needle (to hold back while streaming)."""
    best = 0
    for x in needles:
        for k in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:k]):
                best = k
                break
    return best


def _stable(text: str, final: bool, stops: list[str]) -> str:
    """The part of a growing completion that can be sent: a stop string arriving later would cut the rest."""
    return text if final or not stops else text[: len(text) - _partial_suffix(text, stops)]


class _Channel:
    """One output field (reasoning or answer) trimmed as `str.strip` would, without knowing the end in advance:
    leading whitespace is dropped, trailing whitespace is held until something follows it."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, s: str, end: bool = False) -> str:
        if not self.started:
            s = s.lstrip()
            self.started = bool(s)
        s = self.held + s
        body = s.rstrip()
        self.held = "" if end else s[len(body):]
        return body


class ReasoningSplitter:
    """Splits a completion, as it grows, into reasoning and answer deltas (DeepSeek's reasoning_content/content).

    With a template that pre-fills "<think>" the completion starts inside the reasoning, which runs to the first
    "</think>"; otherwise a completion that opens with "<think>" reasons, and any other is all answer. A possible
    partial tag at the end ("</thi") is held back until the next token settles it. Fed the final text at once,
    it gives the same fields as `r1kit.tokenizer.split_reasoning` does for a completion with one think block.
    """

    def __init__(self, prefilled: bool):
        self.mode = "reasoning" if prefilled else "start"
        self.thought = prefilled  # a think block was opened
        self.closed = False  # ... and closed
        self.pos = 0  # characters of the text consumed
        self.reasoning, self.content = _Channel(), _Channel()

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        while True:
            rest = text[self.pos:]
            if self.mode == "start":
                s = rest.lstrip()
                if s.startswith(THINK):
                    self.pos += len(rest) - len(s) + len(THINK)
                    self.mode, self.thought = "reasoning", True
                    continue
                if not final and THINK.startswith(s):  # nothing yet, or a partial "<think>"
                    break
                self.mode = "content"
            elif self.mode == "reasoning":
                i = rest.find(END_THINK)
                if i >= 0:
                    reasoning += self.reasoning.push(rest[:i], end=True)
                    self.pos += i + len(END_THINK)
                    self.mode, self.closed = "content", True
                    continue
                take = len(rest) if final else len(rest) - _partial_suffix(rest, [END_THINK])
                reasoning += self.reasoning.push(rest[:take], end=final)
                self.pos += take
                break
            else:
                content += self.content.push(rest, end=final)
                self.pos = len(text)
                break
        return reasoning, content


# ----------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics, in a registry of their own (one per server)."""

    def __init__(self, engine: AsyncEngine, server: OpenAIServer):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("r1kit_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("r1kit_request_latency_seconds", "HTTP request latency, to the last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.ttft = Histogram("r1kit_time_to_first_token_seconds", "time from arrival to the first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("r1kit_inter_token_latency_seconds", "time between a request's successive tokens",
                             registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.prompt_tokens = Counter("r1kit_prompt_tokens", "prompt tokens", registry=r)
        self.cache_hit_tokens = Counter("r1kit_prompt_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                        registry=r)
        self.generation_tokens = Counter("r1kit_generation_tokens", "generated tokens", registry=r)
        self.cost = Counter("r1kit_cost_usd", "cost of the requests served, at the price table's rates", registry=r)
        self.rejected = Counter("r1kit_rejected_requests", "requests refused because the queue was full", registry=r)
        Gauge("r1kit_queue_depth", "requests waiting for a cache slot", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("r1kit_running_sequences", "sequences being generated", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("r1kit_inflight_sequences", "sequences accepted and not finished (running + waiting)",
              registry=r).set_function(lambda: server.inflight)


class _Observe:
    """Pure ASGI middleware counting requests by endpoint and status, and timing them to the last byte (a
    BaseHTTPMiddleware would get in the way of streaming and of noticing disconnects)."""

    ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]  # label values stay a bounded set
        endpoint = path if path in self.ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") \
            else "other"
        status, start = [500], time.perf_counter()

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------- server
@dataclass(eq=False)
class _Job:
    """One engine request as the server tracks it."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float  # loop time
    arrival: float = field(default_factory=time.perf_counter)
    last_time: float | None = None
    last: RequestOutput | None = None
    closed: bool = False


class _SSE(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends (finished, failed or disconnected)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


class OpenAIServer:
    """The API's logic over an `AsyncEngine`; `app()` wraps it in FastAPI routes."""

    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, *, api_key: str | None = None,
                 max_queue: int = 256, request_timeout_s: float = 600.0, prices: Prices = Prices(),
                 defaults: dict | None = None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_queue, self.request_timeout_s, self.prices = max_queue, request_timeout_s, prices
        self.defaults = {k: v for k, v in (defaults or {}).items() if k in ("temperature", "top_p", "top_k")}
        self.max_num_seqs = engine.engine.max_num_seqs
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model.config.vocab_size
        self.prefills_think = bool(getattr(tokenizer, "prefills_think", False))
        self.inflight = 0  # sequences accepted and not finished
        self.created = int(time.time())
        self.metrics = Metrics(engine, self)

    # -- checks ------------------------------------------------------------------------------------------------
    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self._key_digest is None:
            return
        given = credentials.credentials if credentials is not None else ""
        # hashing first makes the comparison constant-time in the key's length too
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._key_digest):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def sampling(self, req: _Sampling, n_prompt: int, max_tokens: int | None, logprobs: int | None,
                 prompt_param: str) -> SamplingParams:
        """SamplingParams for a request, after checking it fits the context (OpenAI's 400s, with the numbers)."""
        ctx = self.max_model_len
        if n_prompt >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} "
                                f"tokens. Please shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        room = ctx - n_prompt
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or the completion length.",
                           param="max_tokens", code="context_length_exceeded")
        n = req.n or 1
        if n > self.max_num_seqs:
            raise APIError(400, f"n={n} exceeds this server's {self.max_num_seqs} concurrent sequences "
                                f"(--max-num-seqs)", param="n")
        pick = lambda name, default: v if (v := getattr(req, name)) is not None else self.defaults.get(name, default)
        try:
            return SamplingParams(
                n=n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
                top_k=min(pick("top_k", -1), self.vocab_size),  # larger is "all", and must fit in an int64
                min_p=req.min_p or 0.0, max_tokens=max_tokens or room, min_tokens=min(req.min_tokens or 0,
                                                                                      max_tokens or room),
                stop=req.stop, seed=req.seed, logprobs=logprobs, ignore_eos=bool(req.ignore_eos))
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    # -- jobs: admission, outputs, clean-up --------------------------------------------------------------------
    def submit(self, rid: str, prompts: list[list[int]], params: list[SamplingParams]) -> list[_Job]:
        """Accept a request's prompts (one engine request each) or refuse them all with 429 when the queue is full."""
        seqs = sum(p.n for p in params)
        if self.inflight + seqs > self.max_num_seqs + self.max_queue:
            self.metrics.rejected.inc()
            waiting = max(0, self.inflight - self.max_num_seqs)
            raise APIError(429, f"The server is at capacity ({self.engine.num_running} sequences running, {waiting} "
                                f"waiting, at most {self.max_queue} may wait). Retry after a short while.",
                           type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.inflight += seqs
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        return [_Job(f"{rid}-{i}" if len(prompts) > 1 else rid, ids, sp, deadline)
                for i, (ids, sp) in enumerate(zip(prompts, params))]

    def close(self, job: _Job) -> None:
        """Free a job's slots (if it is still running) and account for it; safe to call more than once."""
        if job.closed:
            return
        job.closed = True
        self.inflight -= job.params.n
        if job.last is None or not job.last.finished:
            self.engine.abort(job.rid)
        if job.last is not None:
            m, out = self.metrics, job.last
            generated = sum(len(o.token_ids) for o in out.outputs)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.cache_hit_tokens.inc(out.num_cached_tokens)
            m.generation_tokens.inc(generated)
            m.cost.inc(self.prices.cost(len(out.prompt_token_ids) - out.num_cached_tokens, out.num_cached_tokens,
                                        generated))

    async def outputs(self, job: _Job) -> AsyncIterator[RequestOutput]:
        """The engine's cumulative outputs for a job, until it finishes or its deadline passes."""
        stream = self.engine.stream(job.prompt_ids, job.params, job.rid)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(job.deadline):
                        out = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise APIError(408, f"The request did not finish within {self.request_timeout_s:g} s "
                                        f"(--request-timeout).", type="timeout", code="timeout") from None
                except RequestError as e:
                    raise APIError(400, str(e), param=e.param) from None
                now = time.perf_counter()
                if job.last_time is None:
                    self.metrics.ttft.observe(now - job.arrival)
                else:
                    self.metrics.itl.observe(now - job.last_time)
                job.last_time, job.last = now, out
                yield out
                if out.finished:
                    return
        finally:
            await stream.aclose()
            self.close(job)

    async def final(self, request: Request, jobs: list[_Job]) -> list[RequestOutput] | None:
        """Run jobs to the end; None if the client went away first (then their slots are freed at once)."""

        async def last(job):
            out = None
            async for out in self.outputs(job):
                pass
            return out

        task = asyncio.ensure_future(asyncio.gather(*(last(j) for j in jobs)))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    return None
            return task.result()
        finally:
            if not task.done():
                task.cancel()
            for j in jobs:
                self.close(j)

    # -- shared pieces of the responses ------------------------------------------------------------------------
    def usage(self, outs: list[RequestOutput], reasoning_tokens: int | None = None) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        hit = sum(o.num_cached_tokens for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": hit},
             "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit,
             "cost": round(self.prices.cost(prompt - hit, hit, completion), 12)}
        if reasoning_tokens is not None:
            u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return u

    def reasoning_tokens(self, token_ids: list[int], splitter: ReasoningSplitter) -> int:
        """Tokens up to and including the one that closes the think block (all of them if it never closes)."""
        if not splitter.thought:
            return 0
        if not splitter.closed:
            return len(token_ids)
        lo, hi = 1, len(token_ids)  # the smallest prefix whose text contains "</think>"
        while lo < hi:
            mid = (lo + hi) // 2
            if END_THINK in self.tok.decode(token_ids[:mid], skip_special_tokens=True):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _token(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False)

    def chat_logprobs(self, ids: list[int], lps: list[dict[int, float]], k: int) -> dict:
        content = []
        for t, d in zip(ids, lps):
            top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": (s := self._token(t)), "logprob": _lp(d[t]), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (u := self._token(a)), "logprob": _lp(b),
                                              "bytes": list(u.encode())} for a, b in top]})
        return {"content": content}

    def completion_logprobs(self, ids: list[int], lps: list[dict[int, float]], k: int, offset: int) -> dict:
        tokens = [self._token(t) for t in ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [_lp(d[t]) for t, d in zip(ids, lps)],
                "top_logprobs": [{self._token(a): _lp(b) for a, b in sorted(d.items(), key=lambda kv: -kv[1])[:k]}
                                 for d in lps] if k else None,
                "text_offset": offsets}

    # -- POST /v1/chat/completions -----------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            ids = self.tok.apply_chat_template([m.for_template() for m in req.messages], add_generation_prompt=True,
                                               tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template's own error (e.g. roles out of order) is the client's
            raise APIError(400, f"The chat template cannot render these messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, len(ids), max_tokens, k, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job, = self.submit(rid, [ids], [params])
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSE(self._chat_events(job, head, include_usage), lambda: self.close(job))
        outs = await self.final(request, [job])
        if outs is None:
            return Response(status_code=499)
        out, choices, reasoning_tokens = outs[0], [], 0
        for o in out.outputs:
            splitter = ReasoningSplitter(self.prefills_think)
            reasoning, content = splitter.feed(o.text, final=True)
            reasoning_tokens += self.reasoning_tokens(o.token_ids, splitter)
            message = {"role": "assistant", "content": content,
                       "reasoning_content": reasoning if splitter.thought else None,
                       "reasoning": reasoning if splitter.thought else None}
            choices.append({"index": o.index, "message": message, "finish_reason": o.finish_reason,
                            "logprobs": None if k is None else self.chat_logprobs(o.token_ids, o.logprobs or [], k)})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": self.usage([out], reasoning_tokens)})

    async def _chat_events(self, job: _Job, head: dict, include_usage: bool) -> AsyncIterator[str]:
        n, k, stops = job.params.n, job.params.logprobs, job.params.stop
        head = {**head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

        def chunk(i: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
            return _sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
        splitters = [ReasoningSplitter(self.prefills_think) for _ in range(n)]
        sent_tokens, done = [0] * n, [False] * n
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            out = None
            async for out in self.outputs(job):
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    final = o.finish_reason is not None
                    reasoning, content = splitters[i].feed(_stable(o.text, final, stops), final)
                    lp = None
                    if k is not None and len(o.token_ids) > sent_tokens[i]:
                        lp = self.chat_logprobs(o.token_ids[sent_tokens[i]:], (o.logprobs or [])[sent_tokens[i]:], k)
                    sent_tokens[i] = len(o.token_ids)
                    if reasoning:
                        yield chunk(i, {"reasoning_content": reasoning, "reasoning": reasoning}, lp=lp)
                        lp = None
                    if content:
                        yield chunk(i, {"content": content}, lp=lp)
                        lp = None
                    if lp is not None:
                        yield chunk(i, {}, lp=lp)
                    if final:
                        done[i] = True
                        yield chunk(i, {}, finish=o.finish_reason)
            if include_usage and out is not None:
                tokens = sum(self.reasoning_tokens(o.token_ids, s) for o, s in zip(out.outputs, splitters))
                yield _sse({**head, "choices": [], "usage": self.usage([out], tokens)})
        except APIError as e:
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001 - the headers are sent: report in the stream
            log.exception("chat stream %s failed", job.rid)
            yield _sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
        yield "data: [DONE]\n\n"

    # -- POST /v1/completions ----------------------------------------------------------------------------------
    async def complete(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = self.vocab_size
        prompts = []
        for x in p:
            try:
                ids = self.tok.encode(x) if isinstance(x, str) else list(x)
            except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate the tokenizer cannot take
                raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
            if not ids and self.tok.bos_token_id is not None:  # an empty prompt starts a new document
                ids = [self.tok.bos_token_id]
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompts.append(ids)
        per = [self.sampling(req, len(ids), req.max_tokens, req.logprobs, "prompt") for ids in prompts]
        n = per[0].n
        if len(prompts) * n > self.max_num_seqs:
            raise APIError(400, f"{len(prompts)} prompts x n={n} exceed this server's {self.max_num_seqs} "
                                f"concurrent sequences (--max-num-seqs)", param="n")
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = self.submit(rid, prompts, per)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSE(self._completion_events(jobs, head, include_usage),
                        lambda: [self.close(j) for j in jobs])
        outs = await self.final(request, jobs)
        if outs is None:
            return Response(status_code=499)
        choices, k = [], req.logprobs
        for pi, out in enumerate(outs):
            for o in out.outputs:
                choices.append({"index": pi * n + o.index, "text": o.text, "finish_reason": o.finish_reason,
                                "logprobs": None if k is None else
                                self.completion_logprobs(o.token_ids, o.logprobs or [], k, 0)})
        return JSONResponse({**head, "choices": choices, "usage": self.usage(outs)})

    async def _completion_events(self, jobs: list[_Job], head: dict, include_usage: bool) -> AsyncIterator[str]:
        n = jobs[0].params.n
        extra = {"usage": None} if include_usage else {}
        sent = {}  # choice index -> [characters sent, tokens sent]
        finals: dict[int, RequestOutput] = {}
        try:
            async for pi, out in _merge([self.outputs(j) for j in jobs]):
                finals[pi] = out
                for o in out.outputs:
                    i = pi * n + o.index
                    chars, toks = sent.setdefault(i, [0, 0])
                    if toks < 0:
                        continue  # finished already
                    final = o.finish_reason is not None
                    text = _stable(o.text, final, jobs[pi].params.stop)[chars:]
                    lp = None
                    k = jobs[pi].params.logprobs
                    if k is not None and len(o.token_ids) > toks:
                        lp = self.completion_logprobs(o.token_ids[toks:], (o.logprobs or [])[toks:], k, chars)
                    sent[i] = [chars + len(text), -1 if final else len(o.token_ids)]
                    if text or lp is not None or final:
                        yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                         "finish_reason": o.finish_reason}], **extra})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": self.usage([finals[i] for i in sorted(finals)])})
        except APIError as e:
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001
            log.exception("completion stream %s failed", head["id"])
            yield _sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
        yield "data: [DONE]\n\n"

    # -- the app -----------------------------------------------------------------------------------------------
    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "r1kit",
                "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            yield
            self.engine.shutdown()  # after uvicorn's graceful shutdown has let the requests in flight finish

        app = FastAPI(title="r1kit", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                      description="OpenAI- and DeepSeek-compatible API over r1kit's engine")
        bearer = HTTPBearer(auto_error=False)

        async def auth(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
            self.authorize(credentials)

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

        @v1.get("/models")
        async def list_models():
            return self.models()

        @v1.get("/models/{model}")
        async def get_model(model: str):
            self.check_model(model)
            return self.models()["data"][0]

        @v1.post("/chat/completions")
        async def chat_completions(req: ChatCompletionRequest, request: Request):
            return await self.chat(req, request)

        @v1.post("/completions")
        async def completions(req: CompletionRequest, request: Request):
            return await self.complete(req, request)

        app.include_router(v1)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.model_name, "running": self.engine.num_running,
                    "waiting": self.engine.num_waiting, "inflight": self.inflight,
                    "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/", include_in_schema=False)
        async def page():
            # Everything from this origin; the page must work offline.
            return FileResponse(WEB_DIR / "index.html", headers={
                "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'"})

        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.exception_handler(APIError)
        async def api_error(request, e: APIError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(request, e: RequestValidationError):
            errors = e.errors()
            first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
            if first.get("type") == "json_invalid":
                return APIError(400, f"The body is not valid JSON: {first.get('msg')}").response()
            param = _param(tuple(first.get("loc", ())))
            more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
            return APIError(400, f"{param or 'body'}: {first.get('msg')}{more}", param=param,
                            code="invalid_value").response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, e: StarletteHTTPException):
            if e.status_code == 404:
                return APIError(404, f"Unknown request URL: {request.method} {request.url.path}.",
                                code="unknown_url").response()
            return APIError(e.status_code, str(e.detail)).response()

        @app.exception_handler(Exception)
        async def crash(request, e: Exception):
            log.exception("request failed")
            return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

        app.add_middleware(_Observe, metrics=self.metrics)
        return app


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for x in it:
                q.put_nowait((i, x))
            q.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, x = await q.get()
            if x is done:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()


# ------------------------------------------------------------------------------------------------------ CLI
def build(args: argparse.Namespace) -> tuple[OpenAIServer, FastAPI]:
    """Load the checkpoint and wrap it in the server and its app (`args`: `r1kit serve`'s flags, see r1kit/cli.py)."""
    import torch

    import r1kit.model as M
    from r1kit.tokenizer import load as load_tokenizer

    path = Path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = M.load(path, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(path)
    engine = AsyncEngine(Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                kv_cache_dtype=args.kv_cache_dtype))
    prices = dict(input_cache_miss=args.price_input_miss, input_cache_hit=args.price_input_hit,
                  output=args.price_output)
    gen = path / "generation_config.json"
    defaults = json.loads(gen.read_text()) if gen.exists() else {}  # e.g. R1's temperature 0.6, top_p 0.95
    server = OpenAIServer(engine, tokenizer, args.served_model_name or path.resolve().name,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_queue=args.max_queue,
                          request_timeout_s=args.request_timeout, defaults=defaults,
                          prices=Prices(**{k: v for k, v in prices.items() if v is not None}))
    return server, server.app()


def main(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server, app = build(args)
    log.info("serving %s (context %d, %d slots) on http://%s:%d%s", server.model_name, server.max_model_len,
             server.max_num_seqs, args.host, args.port, " (API key required)" if server._key_digest else "")
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets the requests in flight finish, then runs the
    # lifespan shutdown, which stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(args.request_timeout) + 5)
    return 0


# ------------------------------------------------------------------------------- for tests and benchmarks
def tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **config) -> Path:
    """A random tiny DeepSeek-V3 (MLA + MoE) with a BPE tokenizer trained on a few hundred strings, saved where
    `r1kit serve` can load it: a servable checkpoint in a second, for tests, benchmarks and trying the server."""
    import torch

    import r1kit.model as M
    from r1kit import config as C
    from r1kit.tokenizer import train_bpe

    texts = [f"What is {a} plus {b}? <think>\nAdd {a} and {b}: carry the tens.\n</think>\n\nThe answer is {a + b}."
             for a in range(40) for b in range(10)]
    tok = train_bpe(texts, vocab_size=400)
    cfg = C.tiny(**{**dict(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           n_routed_experts=8, moe_intermediate_size=16, intermediate_size=64,
                           num_nextn_predict_layers=0, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), **config})
    torch.manual_seed(seed)
    M.save(M.build(cfg), path, tokenizer=tok)
    return Path(path)


def spawn(model_dir: str | os.PathLike, *flags: str, env: dict | None = None,
          timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `r1kit serve` in a child process on a free loopback port; returns it and its base URL once healthy."""
    return spawn_command(lambda port: [sys.executable, "-m", "r1kit.cli", "serve", str(model_dir), "--port", str(port),
                                       "--log-level", "warning", *flags], "r1kit serve", env, timeout_s)


def spawn_command(argv, name: str, env: dict | None = None, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start any HTTP server `argv(port)` on a free loopback port, output to a log file (`proc.logfile`); returns
    the process and its base URL once GET /health answers 200, or raises with the log's tail."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logfile = tempfile.NamedTemporaryFile(prefix=name.replace(" ", "-") + "-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv(port), stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    proc.logfile = logfile.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{Path(logfile.name).read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} did not come up in {timeout_s} s:\n{Path(logfile.name).read_text()[-4000:]}")
