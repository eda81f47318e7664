"""The evaluation protocol: the pass@k estimator, the metrics on a model whose answers we control."""

import math
from itertools import combinations

import pytest
import torch

import r1kit.model as M
from r1kit import config as C
from r1kit import tasks as T
from r1kit.engine import LLM
from r1kit.eval import EvalConfig, evaluate_task, markdown_table, pass_at_k
from r1kit.tokenizer import train_bpe


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 2), (6, 0, 3), (6, 6, 1), (8, 3, 4), (4, 1, 4)])
def test_pass_at_k_is_the_exact_probability(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_metrics_on_a_random_model_are_consistent():
    task = T.load("addition?digits=1&size=40&seed=0")
    tok = train_bpe([f"{e.prompt} {e.answer}" for e in task.examples] * 3, vocab_size=300)
    torch.manual_seed(0)
    model = M.build(C.tiny_dense(vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, eos_token_id=tok.eos_token_id)).eval()
    cfg = EvalConfig(tasks=[task.name], k=4, max_tokens=8, limit=6)
    r = evaluate_task(LLM(model, tokenizer=tok), task, cfg)
    assert r["problems"] == 6 and 0 <= r["pass@1"] <= r["pass@4"] <= 1
    assert 0 <= r["greedy"] <= 1 and 0 < r["mean_response_tokens"] <= 8
    assert [p["m"] for p in r["scaling"]["samples"]] == [1, 2, 4]
    assert r["scaling"]["samples"][-1]["cons"] == r["cons@4"]
    assert "| m | " in markdown_table({"m": {task.name: r}}, 4) or "| m |" in markdown_table({"m": {task.name: r}}, 4)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="k=0"):
        EvalConfig(k=0)


class ScriptedLLM:
    """Answers from a script instead of a model, to check the metrics' arithmetic exactly."""

    def __init__(self, tok, greedy, samples, raw=False):
        self.tokenizer, self.greedy, self.samples, self.raw = tok, greedy, samples, raw  # raw: whole completions

    def generate(self, prompts, params, use_tqdm=False):
        from r1kit.engine import CompletionOutput, RequestOutput

        first = params[0] if isinstance(params, list) else params  # one per prompt, or one for all
        script = [[g] for g in self.greedy] if first.temperature == 0 else self.samples
        return [RequestOutput(str(i), p, [], [CompletionOutput(j, a if self.raw else f"think </think> \\boxed{{{a}}}",
                                                               [1] * (j + 1))
                                                for j, a in enumerate(script[i])], True)
                for i, p in enumerate(prompts)]


def test_metrics_arithmetic_on_scripted_answers():
    task = T.Task("t", [T.Example("q1", "1"), T.Example("q2", "2")])
    tok = train_bpe(["q1 q2 1 2"] * 5, vocab_size=280)
    llm = ScriptedLLM(tok, greedy=["1", "3"], samples=[["1", "1", "9", "1"], ["5", "2", "5", "7"]])
    r = evaluate_task(llm, task, EvalConfig(k=4))
    assert r["greedy"] == 0.5
    assert r["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert r["cons@4"] == 0.5  # q1's vote is 1 (right), q2's is 5 (wrong)
    assert r["pass@4"] == 1.0
    assert r["problems_all_right"] == 0 and r["problems_all_wrong"] == 0 and r["problems_mixed"] == 1
    assert r["mean_response_tokens"] == pytest.approx(2.5)
    first = r["scaling"]["samples"][0]
    assert first["m"] == 1 and first["cons"] == 0.5  # q1's first sample right, q2's wrong


def test_problems_split_by_agreement():
    task = T.Task("t", [T.Example("q1", "1"), T.Example("q2", "2"), T.Example("q3", "1")])
    tok = train_bpe(["q1 q2 q3 1 2"] * 5, vocab_size=280)
    llm = ScriptedLLM(tok, greedy=["1", "2", "1"], samples=[["1", "1"], ["5", "5"], ["1", "2"]])
    r = evaluate_task(llm, task, EvalConfig(k=2))
    assert (r["problems_all_right"], r["problems_all_wrong"], r["problems_mixed"]) == pytest.approx((1 / 3,) * 3)


def test_thinking_rate_and_accuracy_by_mode():
    task = T.Task("t", [T.Example("q1", "1"), T.Example("q2", "2")])
    tok = train_bpe(["q1 q2 1 2"] * 5, vocab_size=280)
    think, direct = "<think>0+1=1</think> {}", "<think></think> {}"
    llm = ScriptedLLM(tok, greedy=["1", "2"], samples=[[think.format(1), think.format(1), direct.format(9), direct.format(1)],
                                                     [think.format(5), direct.format(7), direct.format(7), direct.format(2)]],
                      raw=True)
    r = evaluate_task(llm, task, EvalConfig(k=4, template="r1-zero"))
    assert r["thinking_rate"] == 3 / 8
    assert r["accuracy_thinking"] == pytest.approx(2 / 3)
    assert r["accuracy_direct"] == pytest.approx(2 / 5)
