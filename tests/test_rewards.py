"""Rewards: right on a table of cases (including those math-verify gets subtly wrong on its own), in range and on
time on any input, and scored in worker processes that are killed when they hang."""

import multiprocessing
import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from r1kit import rewards as R
from r1kit.tasks import Example

TIMEOUT_S = 1.0

# (completion, gold, expected accuracy). Completions are what follows the generation prompt.
ACCURACY = [
    # the plain cases
    ("<think>8+6=14</think>\n\n\\boxed{834}", "834", 1.0),
    ("<think>8+6=14</think>\n\n\\boxed{835}", "834", 0.0),
    ("2+3=5\n</think>\n\n\\boxed{5}", "5", 1.0),  # the template pre-filled <think>
    ("<think>r</think> <answer> 42 </answer>", "42", 1.0),  # R1-Zero tags
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{2}}", "\\tfrac32", 1.0),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{-5}", "5", 0.0),
    ("\\boxed{x=3}", "3", 1.0),
    ("\\boxed{5.0}", "5", 1.0),
    ("\\boxed{1/3}", "0.333", 0.0),
    # answers math-verify alone gets wrong (commented with what it does)
    ("\\boxed{2} then \\boxed{3}", "3", 1.0),  # several boxes: it reads the set {2, 3}; the last one counts
    ("\\boxed{3} no wait, \\boxed{2}", "3", 0.0),  # ... and calls {3, 2} != 3 right only by luck
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),  # an undelimited LaTeX gold parses to nothing: never equal
    ("\\boxed{[1,2)}", "[1,2)", 1.0),  # intervals: same
    ("\\boxed{(0,1]}", "(0,1)", 0.0),
    ("\\boxed{\\infty}", "\\infty", 1.0),
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),  # percentages: it calls 50% != 0.5
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{50}", "0.5", 0.0),
    ("\\boxed{1e3}", "1000", 1.0),  # it reads 1e3 as 1
    ("\\boxed{\\$18}", "18", 1.0),  # it cannot parse "\$18" outside a box
    ("\\boxed{18}", "\\$18", 1.0),
    ("\u22124", "-4", 1.0),  # a Unicode minus sign
    ("\\boxed{1,000,000}", "1000000", 1.0),
    ("\\boxed{2 3}", "23", 0.0),
    ("\\boxed{.5}", "5", 0.0),
    ("\\boxed{10^{10}}", "10000000000", 1.0),  # it reads an undelimited 10^{10} as 10
    ("\\boxed{\\text{Monday}}", "Monday", 1.0),
    ("\\boxed{ab}", "ba", 0.0),  # words are not products of symbols (an anagram would match)
    ("\\boxed{yes}", "Yes", 1.0),
    ("The answer is C.", "C", 1.0),  # a bare letter: it finds nothing without StringExtractionConfig
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("(D) because ...", "D", 1.0),
    ("The answer is a dog.", "A", 0.0),
    ("12 dollars", "12", 1.0),
    # only the answer counts, never the reasoning
    ("<think>the answer is 7</think> It is 8.", "7", 0.0),
    ("<think>7 7 7", "7", 0.0),  # thinking never finished
    ("<think>a</think>", "7", 0.0),  # empty answer
    ("anything", "", 0.0),  # empty gold
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY)
def test_accuracy_table(completion, gold, expected):
    assert R.accuracy_reward(completion, gold, timeout_s=5.0) == expected


def test_accuracy_with_a_prefilled_think_ignores_unfinished_reasoning():
    assert R.accuracy_reward("2+3=5 so 5", "5") == 1.0
    assert R.accuracy_reward("2+3=5 so 5", "5", prefilled=True) == 0.0


def test_reasoning_gym_answers_use_the_datasets_own_scorer():
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("countdown", size=1, seed=3)
    entry = dataset[0]
    example = Example(entry["question"], entry["answer"], "reasoning-gym", {"dataset": "countdown", "config": {},
                                                                             "entry": entry})
    assert R.accuracy_reward(f"<think>t</think><answer>{entry['answer']}</answer>", example) == 1.0
    # its own partial credit too, exactly as the dataset scores it
    wrong = R.accuracy_reward("<think>t</think><answer>1+1</answer>", example)
    assert wrong == dataset.score_answer("1+1", entry) < 1.0
    # a different expression reaching the target is right too: checked, not string-compared
    assert entry["answer"] == "82 + 20 + 67 - 50"  # (seed-deterministic)
    assert R.check_answer("20 + 82 - 50 + 67", example) == 1.0


@pytest.mark.parametrize("completion,expected", [
    ("<think>\nr\n</think>\n\nanswer", 1.0),
    ("r\n</think>\n\nanswer", 1.0),  # the template pre-filled <think>
    ("<think> r </think> <answer> 42 </answer>", 1.0),
    ("<think>a</think><think>b</think> answer", 0.0),  # several think blocks
    ("<think>a</think> answer </think>", 0.0),
    ("<think>r</think>", 0.0),  # empty answer
    ("<think>r</think>   \n ", 0.0),
    ("<think>  </think> answer", 0.0),  # empty reasoning
    ("</think> answer", 0.0),
    ("preamble <think>r</think> answer", 0.0),
    ("<think>r unclosed", 0.0),
    ("just an answer", 0.0),
    ("<think>r</think> <answer></answer>", 0.0),
    ("<think>r</think> <answer>1</answer> trailing", 0.0),
    ("<think>r</think> <answer>1</answer><answer>2</answer>", 0.0),
])
def test_format_reward(completion, expected):
    assert R.format_reward(completion) == expected


def test_language_consistency():
    assert R.language_consistency_reward("<think>add the units first</think> 5") == 1.0
    assert R.language_consistency_reward("<think>先把个位相加</think> 5") == 0.0
    assert R.language_consistency_reward("<think>先把个位相加</think> 5", "zh") == 1.0
    assert R.language_consistency_reward("<think>add 个位</think>", "en") == pytest.approx(1 / 3)
    assert R.language_consistency_reward("<think>12+3=15</think> 15") == 0.0  # no words at all
    assert R.language_consistency_reward("<think>считаем</think>", "ru") == 1.0
    with pytest.raises(ValueError, match="not supported"):
        R.language_consistency_reward("x", "klingon")


def test_overlong_penalty_is_dapos():
    # L_max = 100, L_cache = 20: free up to 80 tokens, then linear to -1 at 100, -1 beyond
    assert [R.overlong_penalty(n, 100, 20) for n in (0, 80, 90, 100, 101, 10**6)] == [0.0, 0.0, -0.5, -1.0, -1.0,
                                                                                      -1.0]
    with pytest.raises(ValueError):
        R.overlong_penalty(5, 100, 0)


def test_length_reward_is_cosine_scaled():
    assert R.length_reward(0, 100, True) == pytest.approx(1.0)
    assert R.length_reward(100, 100, True) == pytest.approx(0.5)
    assert R.length_reward(50, 100, True) == pytest.approx(0.75)
    assert R.length_reward(0, 100, False) == pytest.approx(-1.0)
    assert R.length_reward(500, 100, False) == pytest.approx(-0.5)
    assert R.length_reward(20, 100, True) > R.length_reward(60, 100, True)  # shorter right answers earn more
    assert R.length_reward(20, 100, False) < R.length_reward(60, 100, False)  # longer wrong ones lose less


def test_weighted_sum_by_name():
    parts = R.score("<think>r</think> \\boxed{5}", "5", "accuracy=1,format=0.5,overlong", num_tokens=90,
                    max_tokens=100, cache_tokens=20)
    assert parts == {"accuracy": 1.0, "format": 1.0, "overlong": -0.5, "reward": 1.0}
    assert R.parse_weights("accuracy, format=0.1") == {"accuracy": 1.0, "format": 0.1}
    assert R.score("x", "5", {"length": 1.0}, num_tokens=0, max_tokens=10)["reward"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unknown reward"):
        R.parse_weights("accuracy,speed")
    with pytest.raises(ValueError, match="needs"):
        R.score("x", "5", "overlong")
    with pytest.raises(ValueError, match="not a number"):
        R.parse_weights("accuracy=lots")


# ----------------------------------------------------------------------------------------------------------------
# Deadlines


@pytest.fixture(scope="module")
def workers():
    w = R.Workers(max_workers=2)
    yield w
    w.close()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hanging_worker_is_killed_and_replaced(workers):
    assert workers.call(pow, 2, 10, timeout_s=TIMEOUT_S) == 1024
    (pid,) = workers.pids()
    t0 = time.monotonic()
    # Catastrophic regex backtracking runs in C: no signal can interrupt it, only a kill
    assert workers.call(re.match, r"(a+)+$", "a" * 64 + "b", timeout_s=0.3, default="late") == "late"
    assert time.monotonic() - t0 < 2.0
    assert not _alive(pid) and workers.timeouts >= 1
    assert workers.call(pow, 3, 3, timeout_s=TIMEOUT_S) == 27  # a fresh worker took its place
    assert workers.call(int, "not a number", timeout_s=TIMEOUT_S, default=-1) == -1  # errors give the default


def test_broken_machinery_raises_instead_of_scoring_zero(monkeypatch):
    closed = R.Workers()
    closed.close()
    monkeypatch.setattr(R, "shared_workers", lambda: closed)
    with pytest.raises(R.WorkerError):
        R.accuracy_reward("\\boxed{\\frac{1}{2}}", "0.5")
    assert R.accuracy_reward("\\boxed{5}", "5") == 1.0  # (decided without a worker)
    monkeypatch.setattr(R.sys, "executable", "/bin/false")  # a worker that dies while starting
    with pytest.raises(R.WorkerError, match="exited while starting"):
        R.Workers().call(pow, 2, 2)


def test_deadlines_hold_from_threads(workers):
    results = [None] * 4

    def run(i):
        arg = "a" * 64 + "b" if i % 2 else "aaa"
        results[i] = workers.call(re.sub, r"(a+)+$", "", arg, timeout_s=0.5, default="late")

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 < 8.0
    assert results == ["", "late", "", "late"]


def test_math_that_would_never_finish_scores_zero_on_time():
    t0 = time.monotonic()
    assert R.accuracy_reward("\\boxed{9^{9^{9^{9}}}}", "7", timeout_s=TIMEOUT_S) == 0.0
    out = []
    thread = threading.Thread(target=lambda: out.append(R.accuracy_reward("\\boxed{9^{9^{9^{9}}}}", "7",
                                                                          timeout_s=TIMEOUT_S)))
    thread.start()
    thread.join()
    assert out == [0.0] and time.monotonic() - t0 < 4 * TIMEOUT_S + 3.0  # (+ starting fresh workers)
    assert R.accuracy_reward("\\boxed{\\frac{2}{4}}", "0.5") == 1.0  # and verification still works after


def _score_in_child(args):
    return R.accuracy_reward(*args)


def test_rewards_work_inside_worker_processes():
    # e.g. a DataLoader worker: daemonic, not the main thread of the program, math-verify's signals unusable
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.map(_score_in_child, [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4")]) == [1.0, 0.0]


def test_scorer_scores_batches_in_parallel_and_survives_a_hang():
    with R.Scorer("accuracy=1,format=0.5,overlong=1", num_workers=2, timeout_s=0.5, max_tokens=100,
                  cache_tokens=20) as scorer:
        completions = ["<think>a</think> \\boxed{3}", "<think>b</think> \\boxed{9^{9^{9^{9}}}}",
                       "<think>c</think> \\boxed{\\frac{10}{2}}", "no format 7"]
        future = scorer.submit(completions, ["3", "7", "5", "7"], num_tokens=[10, 10, 90, 10])
        results = future.result(timeout=30)
        pids = scorer.workers.pids()
    assert [results[i]["reward"] for i in (0, 2, 3)] == [1.5, 1.5 - 0.5, 1.0]
    assert results[1]["accuracy"] == 0.0  # the one that never finishes: its worker was stopped, or killed
    assert pids and not any(_alive(p) for p in pids)  # closing leaves no worker behind


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing: every reward, any text, always a float in range, always on time

FRAGMENTS = ["\\boxed{", "}", "{", "\\frac", "^{", "9", "0", "-", "\\sqrt", "\\left(", "\\right)", "\\{", "\\}",
             "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\", "&", "\\infty", "<think>", "</think>", "<answer>",
             "</answer>", "$", "%", ",", ".", "x", "=", "\\text{", "\\", "e", "!", "^", "_", "(", ")", "[", "]"]
ADVERSARIAL = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
BINARY = st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
SURROGATES = st.lists(st.integers(0xD800, 0xDFFF).map(chr), max_size=5).map("".join)
ANY_TEXT = st.text(max_size=200) | ADVERSARIAL | BINARY | SURROGATES
GOLDS = st.sampled_from(["5", "\\frac{1}{2}", "\\{1,2\\}", "(0,1]", "B", "Monday", "x^2+1", "", "50\\%"]) | ADVERSARIAL

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _in_range(value, lo, hi):
    return isinstance(value, float) and lo <= value <= hi


@FUZZ
@given(ANY_TEXT, GOLDS)
def test_fuzz_accuracy(completion, gold):
    t0 = time.monotonic()
    assert _in_range(R.accuracy_reward(completion, gold, timeout_s=TIMEOUT_S), 0.0, 1.0)
    assert time.monotonic() - t0 < TIMEOUT_S + 3.0


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT, st.sampled_from(["en", "zh", "ru", "ja"]), st.booleans(), st.integers(-10, 10**6))
def test_fuzz_the_other_rewards(completion, language, prefilled, num_tokens):
    assert _in_range(R.format_reward(completion), 0.0, 1.0)
    assert _in_range(R.language_consistency_reward(completion, language, prefilled=prefilled), 0.0, 1.0)
    assert _in_range(R.overlong_penalty(num_tokens, 4096, 512), -1.0, 0.0)
    assert _in_range(R.length_reward(num_tokens, 4096, num_tokens % 2 == 0), -1.0, 1.0)
    parts = R.score(completion, "5", "format=1,language=0.5,overlong=1", language=language, num_tokens=num_tokens,
                    max_tokens=4096, cache_tokens=512)
    assert all(isinstance(v, float) for v in parts.values())


def test_huge_inputs_stay_fast_and_in_range():
    huge = ["x" * 2_000_000, "<think>" + "word " * 200_000 + "</think> \\boxed{5}",
            "\\boxed{" * 50_000 + "1", "\\frac{" * 20_000 + "}" * 20_000, "\x00\xff" * 500_000]
    for text in huge:
        t0 = time.monotonic()
        assert _in_range(R.accuracy_reward(text, "5", timeout_s=TIMEOUT_S), 0.0, 1.0)
        assert _in_range(R.format_reward(text), 0.0, 1.0)
        assert _in_range(R.language_consistency_reward(text), 0.0, 1.0)
        assert time.monotonic() - t0 < TIMEOUT_S + 5.0
    assert R.accuracy_reward("<think>" + "word " * 200_000 + "</think> \\boxed{5}", "5") == 1.0
