"""The engine: batched, KV-cached generation with continuous batching, prefix caching and MTP speculation.

    llm = LLM("ckpt")                                   # or LLM(model, tokenizer=tok) on live, in-memory weights
    outs = llm.generate(["2+2="], SamplingParams(n=8, temperature=0.6, top_p=0.95, max_tokens=64, seed=0))
    outs[0].outputs[3].text, .token_ids, .finish_reason ("stop" | "length"), .logprobs

The shape of the API is vLLM's. The engine itself speaks token ids; text goes through `r1kit.tokenizer`.

How it works (one `Engine.step()`):
1. admit waiting requests into free cache slots (bounded by `max_num_seqs`; the cache is preallocated, so slots
   are the memory bound). A prompt's longest prefix still held in any slot is copied, not recomputed (prefix
   caching); the rest is prefilled, all admitted prompts in one ragged batch. A request for n samples is
   prefilled once and its cache rows copied to n - 1 more slots (the GRPO fan-out).
2. one decode step for every running sequence (MLA layers attend in latent space: absorbed attention), or,
   with `speculative=k` on a model with an MTP module, one verify step of k MTP drafts (DeepSeek-V3 §2.2; True
   means 1; more than 1 chains the MTP module on its own output). With `compile=True` a decode step is one graph
   from the embedding to the output head, and to the argmax when every row is greedy.
3. finished sequences free their slots; their cache rows stay valid for prefix reuse until the slot is taken.

On CPU, `pack_weights` keeps a second copy of the projections' weights in 16-column panels, which decode steps of
8+ rows read 1.3x faster (`M.pack_linears`). An LLM packs a checkpoint it loads itself (up to 1 GiB of weights);
on live weights it packs only when asked, and then `refresh_weights()` after an update the version counters miss.
`kv_cache_dtype="float16"` (or "bfloat16") keeps the cache in 16 bits: twice the sequences or context in the same
memory, at the price of rounding keys and values as they are stored (default: the model's dtype). On CPU it is not
faster: the kernels convert each block back to float32, which costs what the halved bytes save (docs/BENCHMARKS.md).

Sampling needs no host synchronisation and no per-request generator: a sample is argmax(logits/T - log E)
with E ~ Exp(1) noise derived by hashing (request seed, sample index, step, token id). A request's samples are
therefore the same whatever else shares its batch, and speculative decoding reproduces plain decoding exactly,
sampled or greedy, because the target's choice at each position is a fixed function of its logits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import operator
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable

import torch
from torch import Tensor

import r1kit.model as M


class RequestError(ValueError):
    """A request parameter is invalid; the message names it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------------------------- parameters
@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = all tokens
    min_p: float = 0.0
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None = no log-probs; k = the sampled token's and the top-k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        def bad(name: str, why: str):
            raise RequestError(f"{name}={getattr(self, name)!r}: {why}", param=name)

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            bad("temperature", "must be a number in [0, 100]")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k < 2**31:
            bad("top_k", "must be -1 (off) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be a number in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be an integer in [0, max_tokens]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be None or an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def per_prompt(self, count: int) -> list[SamplingParams]:
        """These params for `count` prompts, each with its own seed drawn from this one. A seed is a noise stream,
        so one seed shared by a batch gives sample j of every prompt the same noise: at the same decision (think or
        answer at once?) they all choose alike, and the samples of different prompts are not independent."""
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(7), "little")
        return [dataclasses.replace(self, seed=(seed * 1_000_033 + i * 7_919 + 1) % 2**61) for i in range(count)]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob} (sampled + top-k)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


# ------------------------------------------------------------------------------------------------ sampling
_M1, _M2 = 0xFF51AFD7ED558CCD - 2**64, 0xC4CEB9FE1A85EC53 - 2**64  # murmur3 fmix64, as signed int64
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64


def _fmix(x: Tensor) -> Tensor:
    """murmur3's 64-bit finaliser on int64 (multiplication wraps; shifts made logical by masking)."""
    x = x ^ ((x >> 33) & 0x7FFFFFFF)
    x = x * _M1
    x = x ^ ((x >> 33) & 0x7FFFFFFF)
    x = x * _M2
    return x ^ ((x >> 33) & 0x7FFFFFFF)


def exponential_noise(keys: Tensor, steps: Tensor, vocab: int) -> Tensor:
    """E ~ Exp(1) of shape (B, vocab), a pure function of (key, step, token): no generator state, no sync."""
    base = _fmix(keys * _GOLDEN + steps)  # (B,)
    x = _fmix(base.unsqueeze(1) + torch.arange(vocab, device=keys.device) * _GOLDEN)
    u = (((x >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53  # uniform in (0, 1)
    return -torch.log(u).float()


def sample(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, min_p: Tensor, keys: Tensor,
           steps: Tensor, filtering: bool, all_greedy: bool = False) -> Tensor:
    """One token per row of logits (B, V). Rows with temperature 0 take the argmax.

    `filtering` (any row uses top-p / top-k / min-p) and `all_greedy` are known on the host: no sync to find out.
    """
    greedy = temperature == 0
    if all_greedy:
        return logits.argmax(dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    if filtering:
        scaled = _filter(scaled, top_p, top_k, min_p)
    noise = exponential_noise(keys, steps, logits.shape[1])
    sampled = (scaled - noise.log()).argmax(dim=-1)  # Gumbel-max: argmax(p / E) in log space
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _filter(scaled: Tensor, top_p: Tensor, top_k: Tensor, min_p: Tensor) -> Tensor:
    V = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(V, device=scaled.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
    drop = rank >= k
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)  # keep the smallest prefix reaching top_p
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)


# ------------------------------------------------------------------------------------------------ requests
@dataclass(eq=False)
class _Seq:
    request: _Request
    index: int
    key: int
    slot: int = -1
    pos: int = 0  # tokens whose K/V are in the cache
    pending: int | None = None  # sampled, not yet fed to the model
    out: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    drafts: list[int] = field(default_factory=list)  # MTP's guesses for the tokens after `pending`

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.out


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq] = field(default_factory=list)
    num_cached_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.out), s.cumulative_logprob if s.logprobs is not None else None,
                                 None if s.logprobs is None else list(s.logprobs), s.finish_reason, s.stop_reason)
                for s in self.seqs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished, self.num_cached_tokens)


# -------------------------------------------------------------------------------------------------- engine
KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dtype(kv_cache_dtype: torch.dtype | str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: the model's ("auto" / None), or float32, float16 or bfloat16 (a name or a dtype).
    A 16-bit cache takes half the memory and rounds the keys and values as they are stored."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return model_dtype
    dtype = KV_CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype) if isinstance(kv_cache_dtype, str) else kv_cache_dtype
    if dtype not in KV_CACHE_DTYPES.values():
        raise RequestError(f"kv_cache_dtype={kv_cache_dtype!r}: must be 'auto' or one of {', '.join(KV_CACHE_DTYPES)}",
                           param="kv_cache_dtype")
    return dtype


class Engine:
    """Step-driven scheduler over a preallocated cache. Not thread-safe: `AsyncEngine` drives it from one thread."""

    def __init__(self, model: M.Transformer, tokenizer=None, *, max_num_seqs: int = 64, max_model_len: int | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None, enable_prefix_caching: bool = True,
                 speculative: bool | int = False, eos_token_ids: Iterable[int] | None = None, compile: bool = False,
                 pack_weights: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # The one-token decode step is hundreds of small ops; compiled, they fuse into one graph (measured:
        # bench/generate.py). Shapes are symbolic, so a changing batch or context is rarely a new compile (batch 1,
        # batches either side of the experts' dense threshold, and contexts past 4,096 keys are separate graphs).
        # Guards on module attributes are skipped: checking them costs as much as a layer per step, and nothing
        # here changes a module's code path after construction.
        # Prefill keeps the eager path, which is also the reference for the compiled one.
        if compile:  # decode and verify at a few batch and context shapes each: more graphs than dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            # Module floats (norm eps, softmax scale, routing scale) as constants, not symbolic inputs that every call
            # re-checks: the guards and the glue before the graph took 120 of a 1,550 us step, now 60.
            torch._dynamo.config.specialize_float = True
            if self.device.type == "cpu":  # the C++ kernels are built out here: a graph can only read the result
                for name in ("latent_attention", "gqa_attention", "small_linear", "small_linear2", "small_linear3",
                             "small_experts"):
                    M.cpu_kernel(name)

        def compiled(fn):
            return torch.compile(fn, dynamic=True, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                "cpp_wrapper": self.device.type == "cpu"}) if compile else fn  # the graph's glue in C++, not Python

        def decode_step(tokens: Tensor, positions: Tensor, cache: M.KVCache, slots: Tensor, kv_len: int, greedy: bool):
            """One token a row -> fp32 logits (B, V), and their argmax when every row is greedy: the head and the
            pick are in the graph too, not two eager calls after it."""
            logits = model(tokens, positions=positions, cache=cache, slots=slots, kv_len=kv_len)[:, -1].float()
            return logits, logits.argmax(dim=-1) if greedy else None

        # plain decoding, verify (k + 1 positions) and MTP's draft chain: three compiled functions
        self._decode_step = compiled(decode_step)
        self._forward, self._drafts = compiled(model.forward), compiled(self._draft_chain)
        self._compiled = compile
        cfg = model.config
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if isinstance(speculative, float) or not 0 <= int(speculative) <= 16:
            raise RequestError(f"speculative must be True/False or a number of draft tokens in 0..16, "
                               f"got {speculative!r}", param="speculative")
        if speculative and not len(model.mtp):
            raise RequestError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)",
                               param="speculative")
        self.speculative = int(speculative)  # MTP drafts per verify step; 0 = plain decoding
        # One row more than any context: the keys attended over (`_kv_len`) never span the whole buffer, which a
        # compiled step would otherwise treat as a new shape (a recompile when a sequence reaches the limit).
        self.cache = M.KVCache(cfg, max_num_seqs, self.max_model_len + 1, device=self.device,
                               dtype=cache_dtype(kv_cache_dtype, next(model.parameters()).dtype), with_mtp=speculative)
        eos = list(eos_token_ids) if eos_token_ids is not None else list(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = set(eos)
        self.enable_prefix_caching = enable_prefix_caching
        # What each slot's cache rows hold (token ids), for prefix reuse; valid_len = 0 means nothing usable.
        self.slot_tokens = torch.zeros(max_num_seqs, self.max_model_len, dtype=torch.long)
        self.slot_valid = [0] * max_num_seqs
        self.free_slots: list[int] = list(range(max_num_seqs))  # least recently freed first
        self.waiting: list[_Request] = []
        self.running: list[_Seq] = []
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._params = list(model.parameters())
        self._weights_version = self._version()
        # the projections' weights again in 16-column panels, for decode steps of 8+ rows (M.pack_linears)
        self.packed_bytes = M.pack_linears(model) if pack_weights else 0  # (0 off CPU: only CPU weights pack)
        self._slot_tokens = self.slot_tokens.numpy()  # the same memory, for the per-step writes
        # a dense model's plain decode step in one C++ call, where it can (M.dense_decoder), else the Python one
        self._dense_step = None if self.speculative else M.dense_decoder(model, self.cache)

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids or LLM(..., tokenizer=...)",
                                   param="prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            try:  # ints of any kind (Python, numpy, 0-d tensors), not floats
                text, ids = None, [operator.index(t) for t in prompt]
            except TypeError:
                raise RequestError(f"prompt token ids must be integers, got {list(prompt)[:8]!r}",
                                   param="prompt") from None
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len}",
                               param="prompt")
        if params.n > self.max_num_seqs:
            raise RequestError(f"n={params.n} exceeds max_num_seqs={self.max_num_seqs}", param="n")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use", param="request_id")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        req = _Request(rid, text, ids, params)
        req.seqs = [_Seq(req, i, (seed * 1_000_003 + i) % 2**62) for i in range(params.n)]
        for s in req.seqs:
            s.logprobs = [] if params.logprobs is not None else None
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
        for s in req.seqs:
            if s.finish_reason is None:
                self._finish(s, "abort")
        del self.requests[request_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. Done automatically when a parameter's version counter moves (an in-place
        update); call it after updates that do not move them (e.g. fused optimizer kernels)."""
        self.slot_valid = [0] * self.max_num_seqs
        self._weights_version = self._version()

    def refresh_weights(self) -> None:
        """After the model's weights changed: forget cached prefixes and pack the projections anew. Done
        automatically at the next admission when a version counter moved; call it after updates that do not move
        them (fused optimizer kernels)."""
        self.reset_prefix_cache()
        if self.packed_bytes:
            M.pack_linears(self.model, refresh=True)
        if self._dense_step is not None:  # (it holds the tensors: a weight replaced by another needs a new one)
            self._dense_step = M.dense_decoder(self.model, self.cache)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Admit and prefill what fits, then decode one token (or verify one draft) for every running sequence.
        Returns the current state of every request that changed this step (only of those that finished, with
        `finished_only`: a caller that does not stream skips building the others); finished ones are forgotten."""
        was_training = self.model.training
        if was_training:  # (a walk over every module: not every step when the caller keeps the model in eval)
            self.model.eval()
        try:
            # weights changed: cached K/V and packed weights are stale. Only admission reuses cached K/V, so only
            # then is it worth the walk over every parameter (a stale pack is never read meanwhile: the kernel
            # checks its weight's version)
            if ((self.enable_prefix_caching or self.packed_bytes) and self.waiting
                    and self._version() != self._weights_version):
                self.refresh_weights()
            touched = self._admit()
            decoding = list(self.running)  # every running sequence has a sampled token to feed
            if decoding:
                if self.speculative:
                    self._verify(decoding)
                else:
                    self._decode(decoding)
                touched.update(s.request for s in decoding)
            self.stats.steps += 1
        finally:
            if was_training:
                self.model.train()
        outputs = []
        for req in touched:
            if req.finished:
                self.requests.pop(req.request_id, None)
            if req.finished or not finished_only:
                outputs.append(req.output())
        return outputs

    def _kv_len(self, n: int) -> int:
        """Keys to attend over, rounded up to a multiple of 64: matmul kernels are set up once per shape (tens of
        ms on CPU), so a context that grows by one token a step must not be a new shape every step. The extra
        keys are masked: each query sees only positions at or before its own."""
        return min(self.max_model_len, -(-n // 64) * 64)

    def _version(self) -> int:
        return sum(p._version for p in self._params)

    # -- admission and prefill ---------------------------------------------------------------------------------
    def _admit(self) -> set[_Request]:
        admitted: list[_Request] = []
        while self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
            req = self.waiting.pop(0)
            admitted.append(req)
            self._place(req)
        if not admitted:
            return set()
        leaders = [req.seqs[0] for req in admitted]
        starts = [s.pos for s in leaders]
        T = max(len(s.request.prompt_ids) - s.pos for s in leaders)
        B = len(leaders)
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        for i, s in enumerate(leaders):
            new = s.request.prompt_ids[s.pos :]
            ids[i, : len(new)] = torch.tensor(new)
            positions[i] = (s.pos + torch.arange(T)).clamp(max=self.max_model_len - 1)
            last[i] = len(new) - 1
        slots = torch.tensor([s.slot for s in leaders])
        hidden = self.model(ids.to(self.device), positions=positions.to(self.device), cache=self.cache,
                            slots=slots.to(self.device), kv_len=self._kv_len(max(len(s.request.prompt_ids) for s in leaders)),
                            head=False)  # (B, T, dim)
        h_last = hidden[torch.arange(B), last.to(self.device)]  # (B, dim)
        logits = self._logits(h_last)  # (B, V)
        if self.speculative:
            self._mtp_prompt(admitted, hidden, positions)
        for i, s in enumerate(leaders):
            n = len(s.request.prompt_ids)
            self.stats.prompt_tokens += n
            self.stats.cached_prompt_tokens += starts[i]
            s.pos = n
            self._remember(s.slot, s.request.prompt_ids)
        # fan out: the other samples of a request copy the leader's prompt rows
        seqs, rows = [], []
        for i, req in enumerate(admitted):
            n = len(req.prompt_ids)
            for s in req.seqs[1:]:
                self._copy_rows(req.seqs[0].slot, s.slot, n)
                self._remember(s.slot, req.prompt_ids)
                s.pos = n
            seqs.extend(req.seqs)
            rows.extend([i] * len(req.seqs))
        rows_t = torch.tensor(rows, device=self.device)
        tokens = self._sample(seqs, logits[rows_t])
        self._accept(seqs, tokens, logits[rows_t])
        if self.speculative:  # each sample's drafts: position n-1 joins h_{n-1} with its first token
            live = [(s, r) for s, r in zip(seqs, rows) if s.finish_reason is None]
            if live:
                dev = self.device
                h = h_last[torch.tensor([r for _, r in live], device=dev)].unsqueeze(1)
                self._draft([s for s, _ in live], h, torch.tensor([[s.pending] for s, _ in live], device=dev),
                            torch.tensor([[s.pos - 1] for s, _ in live], device=dev),
                            torch.zeros(len(live), dtype=torch.long, device=dev))
        return set(admitted)

    def _place(self, req: _Request) -> None:
        """Give each sample a slot; the first one starts from the longest cached prefix of the prompt."""
        prompt = req.prompt_ids
        donor, hit = -1, 0
        if self.enable_prefix_caching:
            L = min(len(prompt) - 1, self.max_model_len)  # at least one token must run to give logits
            if L > 0:
                p = torch.tensor(prompt[:L])
                valid = torch.tensor(self.slot_valid).clamp(max=L)
                match = (self.slot_tokens[:, :L] == p).long().cumprod(dim=1).sum(dim=1)
                match = torch.minimum(match, valid)
                best = int(match.argmax())
                if int(match[best]) > 0:
                    donor, hit = best, int(match[best])
                if self.speculative:  # MTP at position hit-1 needs h_{hit-1}: recompute that position
                    hit = max(0, hit - 1)
                    donor = donor if hit > 0 else -1
        leader = req.seqs[0]
        if donor >= 0 and donor in self.free_slots:
            self.free_slots.remove(donor)
            leader.slot = donor
        else:
            leader.slot = self._take_slot()
            if donor >= 0:
                self._copy_rows(donor, leader.slot, hit)
                # what the slot holds now, for the next request placed before this prefill runs
                self.slot_tokens[leader.slot, :hit] = self.slot_tokens[donor, :hit]
        for s in req.seqs[1:]:
            s.slot = self._take_slot()
        leader.pos = hit
        req.num_cached_tokens = hit
        for s in req.seqs:
            self.slot_valid[s.slot] = 0 if s is not leader else hit
            self.running.append(s)

    def _take_slot(self) -> int:
        # prefer a slot holding nothing reusable, else the least recently freed
        for i, slot in enumerate(self.free_slots):
            if self.slot_valid[slot] == 0:
                return self.free_slots.pop(i)
        return self.free_slots.pop(0)

    def _copy_rows(self, src: int, dst: int, n: int) -> None:
        for layer in self.cache.layers:
            if isinstance(layer, tuple):
                for t in layer:
                    t[dst, :, :n] = t[src, :, :n]
            else:
                layer[dst, :n] = layer[src, :n]

    def _remember(self, slot: int, tokens: list[int]) -> None:
        n = min(len(tokens), self.max_model_len)
        self.slot_tokens[slot, :n] = torch.tensor(tokens[:n])
        self.slot_valid[slot] = n

    # -- decoding ----------------------------------------------------------------------------------------------
    def _decode(self, seqs: list[_Seq]) -> None:
        tokens, positions, slots = [s.pending for s in seqs], [s.pos for s in seqs], [s.slot for s in seqs]
        # the pick in the step when nothing is left to the host: every row greedy, no min_tokens ban this step
        greedy = all(s.request.params.greedy and len(s.out) >= s.request.params.min_tokens for s in seqs)
        if self._dense_step is not None:
            logits, picked = self._dense_step.step(tokens, positions, slots, greedy)
        else:
            dev = self.device
            logits, picked = self._decode_step(
                torch.tensor(tokens, device=dev)[:, None], torch.tensor(positions, device=dev)[:, None], self.cache,
                torch.tensor(slots, device=dev), self._kv_len(max(positions) + 1), greedy)
        for s in seqs:
            self._slot_tokens[s.slot, s.pos] = s.pending  # what each slot's cache rows hold, for prefix reuse
            s.pos += 1
            self.slot_valid[s.slot] = s.pos
        self._accept(seqs, picked if greedy else self._sample(seqs, logits), logits)

    def _logits(self, h: Tensor) -> Tensor:
        """The output head on rows h (N, dim) -> (N, V) fp32 (a few rows on CPU: the small-M kernel, `M.linear`)."""
        return self.model.lm_head(h).float()

    def _sample(self, seqs: list[_Seq], logits: Tensor, offset: int = 0) -> Tensor:
        """One token per row, for each sequence's output step len(out) + offset (a draft or a verified position
        ahead of the sequence samples with the noise of the step it stands for)."""
        params = [s.request.params for s in seqs]
        dev = logits.device
        for i, (s, p) in enumerate(zip(seqs, params)):  # min_tokens: no end before it
            if len(s.out) + offset < p.min_tokens:
                ban = (set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids)
                logits[i, list(ban)] = float("-inf")
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        temperature = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        top_k = torch.tensor([min(p.top_k, logits.shape[1]) for p in params], device=dev)
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32)
        keys = torch.tensor([s.key for s in seqs], device=dev)
        steps = torch.tensor([len(s.out) + offset for s in seqs], device=dev)
        filtering = any(p.top_p < 1 or p.top_k > 0 or p.min_p > 0 for p in params if not p.greedy)
        return sample(logits, temperature, top_p, top_k, min_p, keys, steps, filtering)

    def _accept(self, seqs: list[_Seq], tokens: Tensor, logits: Tensor) -> None:
        """Append each sequence's new token (one host sync for the batch) and apply the stop rules."""
        want_lp = [s for s in seqs if s.logprobs is not None]
        lp = top = None
        if want_lp:
            logp = logits.log_softmax(dim=-1)
            k = max(s.request.params.logprobs for s in want_lp)
            picked = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            top = logp.topk(k, dim=-1) if k else None
            lp = picked
        toks = tokens.tolist()
        for i, s in enumerate(seqs):
            if s.finish_reason is not None:
                continue
            self._append(s, toks[i], None if lp is None else lp[i],
                         None if top is None else (top.indices[i].tolist(), top.values[i].tolist()))

    def _append(self, s: _Seq, tok: int, lp: float | None, top) -> None:
        p = s.request.params
        s.out.append(tok)
        s.pending = tok
        self.stats.generated_tokens += 1
        if s.logprobs is not None:
            entry = {tok: lp}
            if top is not None:
                for t, v in zip(top[0][: p.logprobs], top[1][: p.logprobs]):
                    entry.setdefault(t, v)
            s.logprobs.append(entry)
            s.cumulative_logprob += lp
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(s, "stop", tok)
        if self.tokenizer is not None:
            self._update_text(s)  # may end the sequence on a stop string
        if s.finish_reason is None and (
                (p.max_tokens is not None and len(s.out) >= p.max_tokens) or s.pos + 1 >= self.max_model_len):
            self._finish(s, "length")
            if self.tokenizer is not None:
                self._update_text(s)

    def _update_text(self, s: _Seq) -> None:
        p = s.request.params
        ids = s.out[:-1] if isinstance(s.stop_reason, int) else s.out  # a stop token is not text
        text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
        if s.finish_reason is None and text.endswith("\ufffd"):
            return  # half a UTF-8 character: wait for the rest
        if p.stop and s.finish_reason is None:
            start = max(0, len(s.text) - max(len(x) for x in p.stop))
            hits = sorted((i, x) for x in p.stop if (i := text.find(x, start)) >= 0)
            if hits:
                i, x = hits[0]
                s.text = text[: i + len(x)] if p.include_stop_str_in_output else text[:i]
                self._finish(s, "stop", x)
                return
        s.text = text

    def _finish(self, s: _Seq, reason: str, stop_reason: int | str | None = None) -> None:
        if s.finish_reason is not None:
            return
        s.finish_reason, s.stop_reason = reason, stop_reason
        if s in self.running:
            self.running.remove(s)
        if s.slot >= 0:
            self.free_slots.append(s.slot)

    # -- speculative decoding with the MTP module --------------------------------------------------------------
    # Per running sequence: the main cache holds positions [0, pos); `pending` is token pos; the MTP cache holds
    # positions [0, pos) too (position i joins h_i with token i+1), and `drafts[j]` is MTP's guess for token
    # pos+1+j, chosen with the noise the target will use at that step, so it is accepted exactly when the target
    # agrees.
    def _mtp_layer(self, hidden: Tensor, next_tokens: Tensor, positions: Tensor, slots: Tensor, kv_len: int) -> Tensor:
        """MTP depth 1: hidden h_i (B, T, dim) and token i+1 (B, T) -> normalised states predicting token i+2."""
        layer = self.model.mtp[0]
        ctx = self.model.context(positions, hidden.dtype, self.cache, slots, kv_len)
        return layer.shared_head.norm(layer(hidden, self.model.model.embed_tokens(next_tokens), ctx))

    def _mtp_prompt(self, admitted: list[_Request], hidden: Tensor, positions: Tensor) -> None:
        """MTP over the prompt positions whose next token is a prompt token, on each leader's slot."""
        B, T, _ = hidden.shape
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, req in enumerate(admitted):
            nxt = req.prompt_ids[req.seqs[0].pos + 1 :]  # leader.pos is still the cached prefix here
            ids[i, : min(len(nxt), T)] = torch.tensor(nxt[:T], dtype=torch.long)
        slots = torch.tensor([r.seqs[0].slot for r in admitted], device=self.device)
        self._mtp_layer(hidden, ids.to(self.device), positions.to(self.device), slots,
                        self._kv_len(int(positions.max()) + 1))

    def _static_width(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """For the compiled steps: the positions dimension (1) is static, so inductor unrolls the small matmuls over
        the k + 1 verified positions as it does for one token (a symbolic width measured 1.7x slower)."""
        if self._compiled:
            for t in tensors:
                torch._dynamo.mark_static(t, 1)
        return tensors

    def _draft_chain(self, hidden: Tensor, next_tokens: Tensor, positions: Tensor, slots: Tensor, kv_len: int,
                     pick: Tensor, temperature: Tensor | None, gumbel: Tensor | None) -> Tensor:
        """MTP over (B, W) positions (h_p joined with token p + 1), then k drafts chained from each row's state at
        column pick[b], which predicts the token after the row's pending one. Each further draft runs the MTP module
        on its own output state, which stands in for the main model's h at the next position, joined with the draft
        just made (as vLLM reuses one MTP layer). One compiled graph for the whole chain. -> (B, k) token ids.

        Sampled rows draw draft j with the target's temperature and the Gumbel noise `gumbel[:, j]` (B, k, V) of the
        step it stands for (0 for greedy rows, whose temperature is 1 here), so a draft is accepted exactly when
        the target draws the same token; the target's top-p / top-k / min-p filters and min_tokens ban are not
        applied, and a draft they exclude is simply rejected."""
        B = hidden.shape[0]
        rows = torch.arange(B, device=hidden.device)
        state = self._mtp_layer(hidden, next_tokens, positions, slots, kv_len)[rows, pick]  # (B, dim)
        pos = positions[rows, pick]
        drafts = []
        for j in range(self.speculative):
            logits = self.model.lm_head(state).float()
            if gumbel is not None:
                logits = logits / temperature.unsqueeze(1) + gumbel[:, j]
            drafts.append(logits.argmax(dim=-1))
            if j + 1 < self.speculative:  # near the end of the context the row is not verified: keep it in bounds
                pos = (pos + 1).clamp(max=self.max_model_len - 1)
                state = self._mtp_layer(state[:, None], drafts[-1][:, None], pos[:, None], slots, kv_len)[:, 0]
        return torch.stack(drafts, dim=1)

    def _draft(self, seqs: list[_Seq], hidden: Tensor, next_tokens: Tensor, positions: Tensor, pick: Tensor) -> None:
        """Each sequence's k drafts for its next verify step (see `_draft_chain`), or none near the context's end."""
        dev, k = self.device, self.speculative
        params = [s.request.params for s in seqs]
        temperature = gumbel = None
        if not all(p.greedy for p in params):  # the noise is drawn here, eagerly, exactly as `sample` draws it
            temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
            keys = torch.tensor([s.key for s in seqs], device=dev).repeat_interleave(k)
            steps = (torch.tensor([len(s.out) for s in seqs], device=dev)[:, None] + torch.arange(k, device=dev))
            gumbel = -exponential_noise(keys, steps.flatten(), self.model.config.vocab_size).log()
            sampled = torch.tensor([not p.greedy for p in params], device=dev)
            gumbel = gumbel.view(len(seqs), k, -1) * sampled[:, None, None]
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        kv_len = self._kv_len(max(s.pos for s in seqs) + k)
        hidden, next_tokens, positions = self._static_width(hidden, next_tokens, positions)
        drafts = self._drafts(hidden, next_tokens, positions, slots, kv_len, pick, temperature, gumbel).tolist()
        for s, d in zip(seqs, drafts):
            s.drafts = d if s.pos + k + 1 < self.max_model_len else []  # can verify next step

    def _verify(self, seqs: list[_Seq]) -> None:
        k = self.speculative
        near_end = [s for s in seqs if s.pos + k + 1 >= self.max_model_len or not s.drafts]
        if near_end:
            self._decode(near_end)
        seqs = [s for s in seqs if s not in near_end]
        if not seqs:
            return
        dev = self.device
        start = [s.pos for s in seqs]
        tokens = torch.tensor([[s.pending, *s.drafts] for s in seqs], device=dev)  # (B, k + 1)
        positions = torch.tensor(start, device=dev).unsqueeze(1) + torch.arange(k + 1, device=dev)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        kv_len = self._kv_len(max(start) + k + 1)
        tokens, positions = self._static_width(tokens, positions)
        hidden = self._forward(tokens, positions=positions, cache=self.cache, slots=slots, kv_len=kv_len,
                               head=False)  # (B, k + 1, dim)
        logits = self._logits(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1)  # (B, k + 1, V)
        # the target's token at each position, sampled as if every draft before it had been accepted
        # (in place, as plain decoding does: a min_tokens ban shows in the logprobs too)
        target = torch.stack([self._sample(seqs, logits[:, j], offset=j) for j in range(k + 1)], dim=1)
        targets = target.tolist()
        accepted = []
        for i, s in enumerate(seqs):
            n = 0
            while n < k and targets[i][n] == s.drafts[n]:
                n += 1
            accepted.append(n)
            for j in range(n + 1):
                if s.finish_reason is not None:
                    break
                self.slot_tokens[s.slot, s.pos] = s.pending  # the token whose K/V now sits at row pos
                s.pos += 1
                self._accept_one(s, targets[i][j], logits[i, j])
            self.slot_valid[s.slot] = s.pos
        self.stats.draft_tokens += k * len(seqs)
        self.stats.accepted_tokens += sum(accepted)
        live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if not live:
            return
        # MTP catches up over all k + 1 verified positions in one call: position p joins h_p with the target's token
        # p + 1. Past a row's first rejected draft, h and the tokens are meaningless; those outputs are not used
        # and their cache rows are written again (by the drafting below or the next step) before a query sees them.
        idx = torch.tensor(live, device=dev)
        self._draft([seqs[i] for i in live], hidden[idx], target[idx], positions[idx],
                    torch.tensor([accepted[i] for i in live], device=dev))

    def _accept_one(self, s: _Seq, tok: int, logits: Tensor) -> None:
        lp = top = None
        if s.logprobs is not None:
            logp = logits.log_softmax(dim=-1)
            lp = float(logp[tok])
            k = s.request.params.logprobs
            if k:
                t = logp.topk(k)
                top = (t.indices.tolist(), t.values.tolist())
        if s.finish_reason is None:
            self._append(s, tok, lp, top)


# -------------------------------------------------------------------------------------------- offline API
PACK_AUTO_BYTES = 1 << 30  # LLM packs a checkpoint it loads up to this size (the packs cost as much again)


class LLM:
    """Offline generation, as vLLM's `LLM`: a checkpoint directory or an in-memory model (live weights)."""

    def __init__(self, model: str | Path | M.Transformer, tokenizer=None, *, device=None, dtype=None,
                 max_num_seqs: int = 64, max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 speculative: bool | int = False, compile: bool = False, pack_weights: bool | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None):
        owned = isinstance(model, (str, Path))
        if owned:
            path = Path(model)
            model = M.load(path, device=device, dtype=dtype)
            if tokenizer is None and (path / "tokenizer.json").exists():
                from r1kit.tokenizer import load as load_tokenizer

                tokenizer = load_tokenizer(path)
        self.model, self.tokenizer = model, tokenizer
        if pack_weights is None:  # a checkpoint this LLM loaded: nothing else changes its weights; and not too big
            pack_weights = owned and sum(p.nbytes for p in model.parameters()) <= PACK_AUTO_BYTES
        self.engine = Engine(model, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=enable_prefix_caching,
                             speculative=speculative, compile=compile, pack_weights=pack_weights)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def refresh_weights(self) -> None:
        self.engine.refresh_weights()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids; one prompt alone is accepted too)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts", param="params")
        engine = self.engine
        ids = [engine.add_request(p, sp, request_id=f"gen-{i}-{id(self)}-{time.monotonic_ns()}")
               for i, (p, sp) in enumerate(zip(prompts, plist))]
        done: dict[str, RequestOutput] = {}
        progress = None
        was_training = engine.model.training
        engine.model.eval()  # once for the whole call, not per step
        if use_tqdm:
            from rich.progress import Progress

            progress = Progress(transient=True)
            progress.start()
            task = progress.add_task("generate", total=len(ids))
        try:
            while len(done) < len(ids):
                for out in engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        if progress:
                            progress.update(task, completed=len(done))
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        finally:
            engine.model.train(was_training)
            if progress:
                progress.stop()
        return [done[r] for r in ids]


# ------------------------------------------------------------------------------------------------- async
class AsyncEngine:
    """The engine on a background thread, for servers: submit requests, stream their outputs, cancel them.

    `stream(...)` yields a RequestOutput (cumulative) after every step that changed the request; breaking out of
    the iteration (a client that disconnects) aborts the request and frees its slots at the next step.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="r1kit-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self.engine.waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    async def stream(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers[request_id] = (loop, q)
        done = threading.Event()
        self._inbox.put(("add", (prompt, params, request_id, done)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._subscribers.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _publish(self, request_id: str, item) -> None:
        sub = self._subscribers.get(request_id)
        if sub:
            loop, q = sub
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _loop(self) -> None:
        while not self._stop:
            while True:
                try:
                    kind, arg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    prompt, params, rid, _ = arg
                    try:
                        self.engine.add_request(prompt, params, request_id=rid)
                    except Exception as e:  # noqa: BLE001 - delivered to the caller
                        self._publish(rid, e)
                else:
                    self.engine.abort(arg)
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail every request in flight, keep serving
                for rid in list(self.engine.requests):
                    self._publish(rid, e)
                    self.engine.abort(rid)
                continue
            for out in outs:
                self._publish(out.request_id, out)
