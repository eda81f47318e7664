"""The chat page in a real headless Chromium (Debian's, driven by Playwright): a message goes in, the thinking and
the answer stream into their places, the stop button cancels a reply, and nothing is fetched from elsewhere.

Needs /usr/bin/chromium (`apt-get install -y chromium`; .ci/run installs it); skipped with that advice without it.
"""

import threading
from pathlib import Path

import httpx
import pytest
import torch

from r1kit.engine import LLM, SamplingParams
from r1kit.serve import spawn, tiny_checkpoint
from r1kit.tokenizer import ANSWER, END_THINK, THINK

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "What is 2 plus 3?"
SAMPLING = dict(temperature=1.0, max_tokens=32)  # what the page sends; top_p is the server's default
TOP_P = 0.95  # that default, from the checkpoint's generation_config.json

if not CHROMIUM.exists():
    pytest.skip(f"the chat-page test needs Debian's chromium at {CHROMIUM}: install it with "
                f"`apt-get update && apt-get install -y chromium` (as .ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in r1kit's dev extras)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("web") / "tiny-r1")


@pytest.fixture(scope="module")
def seed(checkpoint):
    """A seed whose reply both thinks and answers (see test_serve.reference)."""
    llm = LLM(checkpoint, max_num_seqs=64, max_model_len=256)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs = llm.generate([prompt] * 64, [SamplingParams(**SAMPLING, top_p=TOP_P, seed=s) for s in range(64)])
    finally:
        torch.set_num_threads(threads)
    for s, out in enumerate(outs):
        text = out.outputs[0].text
        reasoning, answer = llm.tokenizer.split_reasoning(text)
        if text.count(END_THINK) == 1 and THINK not in text and ANSWER not in text and reasoning and answer:
            return s
    pytest.fail("no seed in 0..63 gives a reply that thinks and answers")


@pytest.fixture(scope="module")
def server(checkpoint):
    # one slot, so a long request in the background can hold the page's request in the queue
    proc, url = spawn(checkpoint, "--max-num-seqs", "1", "--max-queue", "4", env={"OMP_NUM_THREADS": "1"})
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server)
    sync_api.expect(page.locator("#model")).to_have_text("tiny-r1")
    yield page
    assert all(u.startswith(server) for u in requested), f"the page fetched from elsewhere: {requested}"
    context.close()


def test_send_shows_streamed_thinking_and_answer(page, server, seed):
    page.click("#settings summary")
    page.fill("#temperature", "1")
    page.fill("#max-tokens", str(SAMPLING["max_tokens"]))
    page.fill("#seed", str(seed))
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    turn = page.locator(".turn.assistant").last
    sync_api.expect(turn.locator(".meta")).to_contain_text("tokens", timeout=30_000)  # the usage chunk came
    # the same reply the API gives for the same request
    api = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "tiny-r1", "messages": [{"role": "user", "content": QUESTION}], "seed": seed, **SAMPLING}).json()
    message = api["choices"][0]["message"]
    thinking = turn.locator("details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is not None
    assert turn.locator(".reasoning").text_content() == message["reasoning_content"] != ""
    assert turn.locator(".answer").text_content() == message["content"] != ""
    meta = turn.locator(".meta").text_content()
    assert f"{api['usage']['completion_tokens']} tokens" in meta and "$" in meta
    thinking.locator("summary").click()  # collapsible
    assert thinking.get_attribute("open") is None
    assert page.locator(".turn.user .text").last.text_content() == QUESTION
    sync_api.expect(page.locator("#send")).to_be_visible()


def test_stop_cancels_the_reply(page, server):
    # a long request takes the only slot, so the page's request waits in the queue until it is stopped
    body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    started, release = threading.Event(), threading.Event()

    def hog():
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if release.is_set():
                    return

    t = threading.Thread(target=hog, daemon=True)
    t.start()
    try:
        assert started.wait(30)
        page.fill("#prompt", "Are you there?")
        page.click("#send")
        sync_api.expect(page.locator("#stop")).to_be_visible()
        sync_api.expect(page.locator(".turn.assistant .meta").last).to_have_text("generating…")
        assert httpx.get(f"{server}/health").json()["inflight"] == 2
        page.click("#stop")
        sync_api.expect(page.locator(".turn.assistant").last).to_have_class("turn assistant stopped")
        sync_api.expect(page.locator("#send")).to_be_visible()
        # the server let go of the page's request
        for _ in range(50):
            if httpx.get(f"{server}/health").json()["inflight"] == 1:
                break
            page.wait_for_timeout(50)
        assert httpx.get(f"{server}/health").json()["inflight"] == 1
    finally:
        release.set()
        t.join(30)
