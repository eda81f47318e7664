"""`r1kit distill`: teacher samples from a real `r1kit serve` on loopback (and a scripted flaky endpoint for the
failure paths), kept or rejected by the task's reward, appended a line a sample, resumed after a kill."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from r1kit import tasks
from r1kit.distill import DistillError, distill, rejected_path, sample_id
from r1kit.serve import spawn, tiny_checkpoint

TASK = "addition?digits=1&size=12&seed=3"


def rows(path):
    return [json.loads(line) for line in open(path)] if path.exists() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("distill") / "teacher")
    proc, url = spawn(ckpt, "--max-model-len", "256", "--served-model-name", "teacher",
                      env={"OMP_NUM_THREADS": "1"})
    yield url + "/v1", ckpt
    proc.terminate()
    proc.wait(30)


def test_against_r1kit_serve_every_sample_once(server, tmp_path):
    url, _ = server
    out = tmp_path / "data.jsonl"
    s = distill(task=TASK, teacher_url=url, output=str(out), samples=2, max_tokens=24, reject=False,
                concurrency=4, progress=False)
    assert (s["asked"], s["kept"], s["rejected"]) == (24, 24, 0)
    got = rows(out)
    examples = list(tasks.load(TASK))
    assert sorted(r["id"] for r in got) == sorted(sample_id(e, j) for e in examples for j in range(2))
    for r in got:
        assert r["teacher"] == "teacher"  # the first model the endpoint lists
        assert r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant"
    again = distill(task=TASK, teacher_url=url, output=str(out), samples=2, max_tokens=24, reject=False,
                    progress=False)
    assert (again["asked"], again["already_done"]) == (0, 24)  # nothing asked twice

    # a random teacher is wrong: with rejection on, every answer lands in the .rejected twin, with the reason
    out2 = tmp_path / "judged.jsonl"
    s = distill(task=TASK, teacher_url=url, teacher_model="teacher", output=str(out2), max_tokens=24,
                concurrency=3, progress=False)
    assert s["kept"] + s["rejected"] == 12 and len(rows(out2)) == s["kept"]
    assert {r["rejected"] for r in rows(rejected_path(out2))} <= {"truncated", "no reasoning or no answer",
                                                                  "wrong answer"}


def test_a_killed_job_resumes_without_loss_or_duplicates(server, tmp_path):
    url, _ = server
    out = tmp_path / "data.jsonl"
    argv = [sys.executable, "-m", "r1kit.cli", "distill", "--task", "addition?digits=1&size=30&seed=4",
            "--teacher-url", url, "--output", str(out), "--samples", "2", "--max-tokens", "24",
            "--no-reject", "--concurrency", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(rows(out)) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(rows(out))
    with open(out, "a") as f:
        f.write('{"id": "torn')  # as if the kill had landed in mid-write
    assert subprocess.run(argv, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
    ids = [r["id"] for r in rows(out)]
    assert 5 <= first < 60 and len(ids) == 60 and len(set(ids)) == 60


class Flaky(BaseHTTPRequestHandler):
    """Answers by a script: 503, then 429 with Retry-After, then a correct answer (reasoning in `reasoning_content`
    for one prompt, in a <think> block for the other); 401 for the key 'bad'."""
    calls = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Flaky.calls.append(body)
        if self.headers.get("authorization") == "Bearer bad":
            return self.reply(401, {"error": {"message": "invalid key"}})
        n = sum(c["messages"] == body["messages"] for c in Flaky.calls)
        if n == 1:
            return self.reply(503, {"error": {"message": "overloaded"}})
        if n == 2:
            return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        question = body["messages"][-1]["content"]
        a, b = [int(x) for x in question.split("What is ")[1].rstrip("?").split("+")]
        msg = {"content": f"{a + b}", "reasoning_content": f"{a} plus {b}"} if a % 2 else \
            {"content": f"<think>{a} and {b}</think>{a + b + 1}"}  # wrong on purpose
        self.reply(200, {"choices": [{"message": {"role": "assistant", **msg}, "finish_reason": "stop"}],
                         "usage": {"completion_tokens": 5}})

    def reply(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky():
    Flaky.calls = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


def test_retries_then_judges_each_answer(flaky, tmp_path, monkeypatch):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for a, b in ((3, 4), (2, 5))))
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("TEACHER_KEY", "good")
    s = distill(task=str(data), teacher_url=flaky, teacher_model="m", api_key_env="TEACHER_KEY", output=str(out),
                backoff_s=0.01, progress=False)
    assert len(Flaky.calls) == 6  # per prompt: 503, 429, then the answer
    assert "max_tokens" not in Flaky.calls[-1]  # by default the server decides: as much as its context holds
    assert (s["kept"], s["rejected"]) == (1, 1)
    kept = rows(out)[0]["messages"][-1]
    assert kept == {"role": "assistant", "reasoning_content": "3 plus 4", "content": "7"}
    bad = rows(rejected_path(out))[0]
    assert bad["rejected"] == "wrong answer" and bad["messages"][-1]["reasoning_content"] == "2 and 5"


def test_a_refused_key_stops_with_the_variable_named(flaky, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "bad")
    with pytest.raises(DistillError, match=r"HTTP 401.*\$TEACHER_KEY is set"):
        distill(task=TASK, teacher_url=flaky, teacher_model="m", api_key_env="TEACHER_KEY",
                output=str(tmp_path / "o.jsonl"), backoff_s=0.01, progress=False)
    r = subprocess.run([sys.executable, "-m", "r1kit.cli", "distill", "--task", TASK, "--teacher-url", flaky,
                        "--teacher-model", "m", "--output", str(tmp_path / "o.jsonl"), "--api-key-env", "TEACHER_KEY"],
                       capture_output=True, text=True, env={**os.environ, "TEACHER_KEY": "bad"})
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_teacher_gives_up_after_the_retries(tmp_path):
    with pytest.raises(DistillError, match="after 2 retries"):
        distill(task=TASK, teacher_url="http://127.0.0.1:9/v1", teacher_model="m", output=str(tmp_path / "o.jsonl"),
                max_retries=2, backoff_s=0.01, progress=False)


def test_a_checkpoint_teacher(server, tmp_path):
    _, ckpt = server
    out = tmp_path / "data.jsonl"
    s = distill(task=TASK, teacher=str(ckpt), output=str(out), samples=2, max_tokens=16, reject=False, progress=False)
    assert s["kept"] == 24 and len({r["id"] for r in rows(out)}) == 24
