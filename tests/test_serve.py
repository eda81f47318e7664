"""`r1kit serve` as a client sees it: the official `openai` client against real server processes on loopback ports,
serving a tiny random model. One server per purpose, started once per module:

- `server`: the API itself (reasoning split, streaming, n, stop, seeds, usage, errors, metrics, fuzzing, load);
- `tight`: one cache slot, one waiting place and a 3 s timeout, for the limits (429, disconnects, 408);
- a third, in the SIGTERM test, which it stops.
"""

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest
import torch

from r1kit.engine import LLM, SamplingParams
from r1kit.serve import Prices, ReasoningSplitter, spawn, tiny_checkpoint
from r1kit.tokenizer import ANSWER, END_THINK, THINK

KEY = "sk-r1kit-test"
NAME = "tiny-r1"
MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]
SAMPLING = dict(temperature=1.0, top_p=1.0, max_tokens=32)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the server shares 2 cores with the tests: no OpenMP spinning against them


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A seed whose completion thinks, closes its think block once and answers, with that completion: found
    offline with the engine the server runs on (a random model closes "</think>" in ~10% of 32-token samples)."""
    llm = LLM(checkpoint, max_num_seqs=64, max_model_len=256)
    prompt = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is many times faster than two on a busy machine
    try:
        outs = llm.generate([prompt] * 64, [SamplingParams(**SAMPLING, seed=s) for s in range(64)])
    finally:
        torch.set_num_threads(threads)
    for seed, out in enumerate(outs):
        text = out.outputs[0].text
        reasoning, answer = llm.tokenizer.split_reasoning(text)
        if text.count(END_THINK) == 1 and THINK not in text and ANSWER not in text and reasoning and answer:
            ids = out.outputs[0].token_ids
            return {"seed": seed, "text": text, "token_ids": ids, "prompt_ids": prompt, "reasoning": reasoning,
                    "answer": answer, "reasoning_tokens": ids.index(llm.tokenizer.token_to_id(END_THINK)) + 1}
    pytest.fail("no seed in 0..63 gives a completion that closes its think block: change the tiny checkpoint")


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = spawn(checkpoint, "--max-model-len", "256", "--max-num-seqs", "32", "--max-queue", "64",
                      env={**ONE_THREAD, "R1KIT_API_KEY": KEY})  # the key from the environment
    yield url, proc
    stop_server(proc)


@pytest.fixture(scope="module")
def tight(checkpoint):
    proc, url = spawn(checkpoint, "--max-num-seqs", "1", "--max-queue", "1", "--request-timeout", "3",
                      "--api-key", KEY, "--served-model-name", "tight", env=ONE_THREAD)  # the key from the flag
    yield url
    stop_server(proc)


def client(url, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat(url, **kw):
    return client(url).chat.completions.create(model=NAME, messages=MESSAGES, **{**SAMPLING, **kw})


def health(url) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_idle(url, within_s):
    deadline = time.monotonic() + within_s
    while (h := health(url))["inflight"] or h["running"]:
        assert time.monotonic() < deadline, f"slots not freed within {within_s} s: {h}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the API
def test_models(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_chat_splits_reasoning_from_answer(server, reference):
    url, _ = server
    r = chat(url, seed=reference["seed"])
    m = r.choices[0].message
    # the same completion as the engine offline, split as the tokenizer splits it
    assert (m.reasoning_content, m.content) == (reference["reasoning"], reference["answer"])
    assert m.reasoning == m.reasoning_content  # vLLM's field name
    assert r.model == NAME and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    u = r.usage
    assert u.prompt_tokens == len(reference["prompt_ids"])
    assert u.completion_tokens == len(reference["token_ids"]) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == reference["reasoning_tokens"] < u.completion_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.cost == pytest.approx(Prices().cost(u.prompt_cache_miss_tokens, u.prompt_cache_hit_tokens,
                                                 u.completion_tokens))


def test_stream_sends_reasoning_deltas_then_content(server, reference):
    url, _ = server
    stream = chat(url, seed=reference["seed"], stream=True, stream_options={"include_usage": True})
    kinds, reasoning, content, finish, usage = [], "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta
            if getattr(d, "reasoning_content", None):
                assert d.reasoning == d.reasoning_content
                reasoning += d.reasoning_content
                kinds.append("r")
            if d.content:
                content += d.content
                kinds.append("c")
            finish = ch.finish_reason or finish
    assert (reasoning, content) == (reference["reasoning"], reference["answer"])
    assert kinds.count("r") > 1 and kinds.count("c") >= 1  # streamed token by token
    assert "r" not in kinds[kinds.index("c"):]  # all the thinking first, then the answer
    assert finish in ("stop", "length")
    assert usage.completion_tokens == len(reference["token_ids"])
    assert usage.completion_tokens_details.reasoning_tokens == reference["reasoning_tokens"]


def test_reasoning_content_sent_back_is_dropped(server):
    url, _ = server
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    with_reasoning = [turns[0], {**turns[1], "reasoning_content": "a long thought " * 20}, turns[2]]
    plain = client(url).chat.completions.create(model=NAME, messages=turns, max_tokens=1)
    r = client(url).chat.completions.create(model=NAME, messages=with_reasoning, max_tokens=1)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_n_samples_and_seeds(server):
    url, _ = server
    a = chat(url, n=3, seed=11, max_tokens=12)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [(c.message.reasoning_content, c.message.content) for c in a.choices]
    assert len(set(texts)) > 1  # independent samples
    again = chat(url, n=3, seed=11, max_tokens=12)
    assert [(c.message.reasoning_content, c.message.content) for c in again.choices] == texts  # reproducible
    other = chat(url, n=3, seed=12, max_tokens=12)
    assert [(c.message.reasoning_content, c.message.content) for c in other.choices] != texts


def test_prefix_cache_hits_are_reported_and_priced(server):
    url, _ = server
    long = [{"role": "user", "content": "Count: " + "plus " * 40}]
    first = client(url).chat.completions.create(model=NAME, messages=long, max_tokens=2, seed=1)
    second = client(url).chat.completions.create(model=NAME, messages=long, max_tokens=2, seed=1)
    assert second.usage.prompt_cache_hit_tokens >= second.usage.prompt_tokens - 1 > 40
    assert second.usage.cost < first.usage.cost  # hits cost $0.14 per million, misses $0.55


def test_stop_strings(server, reference):
    url, _ = server
    c = client(url)
    full = c.completions.create(model=NAME, prompt="What is", seed=5, max_tokens=24, temperature=1.0, top_p=1.0,
                                extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip())
    expected = text[: text.find(stop)]
    cut = c.completions.create(model=NAME, prompt="What is", seed=5, max_tokens=24, temperature=1.0, top_p=1.0,
                               stop=[stop], extra_body={"ignore_eos": True})
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    # streamed, nothing of the stop string leaks out before the server knows it is one
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="What is", seed=5, max_tokens=24, temperature=1.0, top_p=1.0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices)
    assert streamed == expected


def test_completions(server):
    url, _ = server
    c = client(url)
    r = c.completions.create(model=NAME, prompt=["2 plus 3", "4 plus 4"], n=2, max_tokens=4, seed=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens)
    ids = c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_chat_logprobs(server):
    url, _ = server
    r = chat(url, seed=3, max_tokens=5, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6


def test_unknown_fields_are_ignored(server):
    url, _ = server
    r = chat(url, max_tokens=2, user="alice", extra_body={"frobnicate": {"x": 1}, "presence_penalty": 0})
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------------ errors
def error_of(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_401_without_the_key(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, key="sk-wrong").chat.completions.create(model=NAME, messages=MESSAGES)
    assert error_of(e)["code"] == "invalid_api_key" and KEY not in e.value.response.text
    assert httpx.get(f"{url}/v1/models").status_code == 401  # no key at all
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # the health check needs no key


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(n=33), "n"),  # more than the server's slots
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=1000), "max_tokens"),  # past the context, with the numbers
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"stream": "yes"}), "stream"),
    (dict(extra_body={"messages": [{"role": "robot", "content": "hi"}]}), "messages[0].role"),
    (dict(extra_body={"messages": []}), "messages"),
    (dict(extra_body={"stop": 7}), "stop"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
])
def test_400_names_the_parameter(server, kw, param):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        chat(url, **kw)
    err = error_of(e)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_400_prompt_longer_than_the_context(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "apple " * 400}])
    err = error_of(e)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    assert str(e.value.response.json()["error"]["message"]).count("tokens") >= 2


def test_404_unknown_model_and_url(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert error_of(e)["param"] == "model" and error_of(e)["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"}, json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_400_invalid_json(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                          "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", [
    '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',  # a lone surrogate echoed back
    '{"model": "tiny-r1", "prompt": "hi \\udfff", "max_tokens": 2}',  # ... that the tokenizer refuses
    '{"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_k": 1e30}',
    '{"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_k": 100000000000000000000}',
    '{"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": -123456789012345678901234567890}',
    '{"model": "tiny-r1", "prompt": "", "max_tokens": 2}',
    '[]',
])
def test_hostile_values_get_4xx_or_an_answer(server, body):
    url, _ = server
    r = httpx.post(f"{url}/v1{'/completions' if 'prompt' in body else '/chat/completions'}", content=body.encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert r.status_code in (200, 400, 404), r.text
    assert "error" in r.json() if r.status_code != 200 else r.json()["choices"]


def test_metrics(server):
    url, _ = server
    chat(url, max_tokens=2)
    text = httpx.get(f"{url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['r1kit_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["r1kit_prompt_tokens_total"] > 0 and values["r1kit_generation_tokens_total"] > 0
    assert "r1kit_prompt_cache_hit_tokens_total" in values and "r1kit_queue_depth" in values
    assert values["r1kit_time_to_first_token_seconds_count"] >= 1 and values["r1kit_cost_usd_total"] > 0
    assert "r1kit_inter_token_latency_seconds_bucket" in text and "r1kit_request_latency_seconds_bucket" in text


# ----------------------------------------------------------------------------------------------- limits
def long_request(c, **kw):
    return c.chat.completions.create(model="tight", messages=MESSAGES, max_tokens=4000,
                                     extra_body={"ignore_eos": True}, **kw)


def test_429_when_the_queue_is_full(tight):
    c = client(tight)
    running = long_request(c, stream=True)
    next(iter(running))
    waiting = long_request(c, stream=True)  # the one place in the queue
    try:
        with pytest.raises(openai.RateLimitError) as e:
            long_request(c)
        assert e.value.response.headers["retry-after"] == "1"
        assert error_of(e)["code"] == "rate_limit_exceeded"
    finally:
        running.close()
        waiting.close()
    wait_idle(tight, 2)


def test_disconnect_frees_the_slot_at_once(tight):
    c = client(tight)
    stream = long_request(c, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then the first generated text: it holds the only slot
    assert health(tight)["running"] == 1
    start = time.monotonic()
    stream.close()
    wait_idle(tight, 1.5)  # well before its 4000 tokens or the 3 s timeout
    assert time.monotonic() - start < 1.5
    assert client(tight).chat.completions.create(model="tight", messages=MESSAGES, max_tokens=2).choices
    # a client that stops waiting for a non-streamed reply frees it too (the server looks every 0.5 s)
    with pytest.raises(openai.APITimeoutError):
        long_request(client(tight).with_options(timeout=0.5))
    start = time.monotonic()
    wait_idle(tight, 1.5)
    assert time.monotonic() - start < 1.5


def test_408_after_the_request_timeout(tight):
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        long_request(client(tight))
    assert e.value.status_code == 408 and error_of(e)["code"] == "timeout"
    assert 2.5 < time.monotonic() - start < 10
    wait_idle(tight, 2)


def test_sigterm_finishes_requests_in_flight(checkpoint):
    proc, url = spawn(checkpoint, "--max-model-len", "1024", env=ONE_THREAD)
    try:
        body = {"model": NAME, "messages": MESSAGES, "max_tokens": 100, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {") and "reasoning_content" in line:
                    break  # generating
            os.kill(proc.pid, signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 100  # it ran to the end after SIGTERM
        proc.wait(30)  # and then the server exited
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------------------- fuzz and load
def test_fuzz_from_the_openapi_schema_gives_no_5xx(server):
    """Schema-conforming and schema-violating requests to every operation: 4xx at worst, never 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies as st
    from schemathesis import GenerationMode

    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        if isinstance(case.body, dict):
            if isinstance(case.body.get("model"), str):
                case.body["model"] = NAME  # else nearly every request stops at the 404
            for k in ("max_tokens", "max_completion_tokens"):  # short generations: the fuzz is about the API
                if case.body.get(k) is None or (type(case.body[k]) is int and case.body[k] > 4):
                    case.body[k] = 4
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text[:500]}"

    check()
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


def test_64_concurrent_streams_no_errors_memory_flat(server):
    url, proc = server
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 16, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one(http, i):
        tokens = 0
        async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "seed": i}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        return tokens

    async def wave():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    def rss_mb():
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    assert asyncio.run(wave()) == [16] * 64  # warm-up: every stream whole
    before = rss_mb()
    for _ in range(2):
        assert asyncio.run(wave()) == [16] * 64
    assert rss_mb() - before < 20, f"server memory grew from {before:.0f} to {rss_mb():.0f} MB"
    wait_idle(url, 2)


def test_reasoning_splitter_holds_back_partial_tags():
    s = ReasoningSplitter(prefilled=True)
    pieces = ["Let me", " think.</", "thi", "nk>\n\n", "It is ", "5.  "]
    text, got = "", []
    for i, p in enumerate(pieces):
        text += p
        got.append(s.feed(text, final=i == len(pieces) - 1))
    assert got == [("Let me", ""), (" think.", ""), ("", ""), ("", ""), ("", "It is"), ("", " 5.")]
    plain = ReasoningSplitter(prefilled=False)
    assert plain.feed("<thi", False) == ("", "") and plain.feed("<think>a</think>b", True) == ("a", "b")
    assert ReasoningSplitter(prefilled=False).feed("no tags", True) == ("", "no tags")


def test_cli_serve_passes_the_cache_dtype(checkpoint, monkeypatch):
    """`r1kit serve --kv-cache-dtype bfloat16` builds the engine with a bfloat16 cache (uvicorn stubbed out)."""
    import uvicorn

    from r1kit import serve
    from r1kit.cli import main

    built = {}
    real_build = serve.build

    def spy(args):
        built["server"], app = real_build(args)
        return built["server"], app

    monkeypatch.setattr(serve, "build", spy)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", str(checkpoint), "--kv-cache-dtype", "bfloat16", "--max-num-seqs", "2"]) == 0
    cache = built["server"].engine.engine.cache
    assert cache.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in cache.layers)
