"""Test-time compute: voting, best-of-N and the thinking budget."""

import pytest
import torch

import r1kit.model as M
from r1kit import config as C
from r1kit.engine import LLM, SamplingParams
from r1kit.testtime import best_of_n, extract_answer, generate_with_budget, majority_vote
from r1kit.tokenizer import END_THINK, train_bpe


def test_majority_vote_groups_equal_answers():
    assert majority_vote(["\\boxed{1/2}", "0.5", "3", "$0.5$", ""]) == ("\\boxed{1/2}", 0.6)
    assert majority_vote(["", " "]) == (None, 0.0)
    assert majority_vote(["7", "8"])[0] == "7"  # a tie goes to the earliest


def test_best_of_n_picks_the_highest_reward():
    idx, scores = best_of_n(["a", "bbb", "cc"], reward=len)
    assert idx == 1 and scores == [1.0, 3.0, 2.0]


def test_extract_answer_reads_after_the_reasoning():
    assert extract_answer(f"carry the one {END_THINK} 42") == "42"


@pytest.fixture(scope="module")
def llm():
    texts = [f"{a} plus {b} is {a + b}. Wait, check. {END_THINK} done" for a in range(20) for b in range(10)]
    tok = train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    model = M.build(C.tiny_dense(vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, eos_token_id=tok.eos_token_id,
                                 max_position_embeddings=256)).eval()
    return LLM(model, tokenizer=tok)


def test_budget_caps_the_reasoning_and_forces_an_answer(llm):
    end = llm.tokenizer.token_to_id(END_THINK)
    with torch.no_grad():  # never choose to stop thinking on its own
        llm.model.lm_head.weight[end] = -10 * llm.model.lm_head.weight.abs().max()
    out = generate_with_budget(llm, ["1 plus 2"], SamplingParams(n=3, temperature=1.0, seed=0), budget=12,
                               answer_tokens=5)
    assert len(out) == 1 and len(out[0]) == 3
    for s in out[0]:
        assert s.reasoning_tokens == 12 and s.budget_hit
        assert END_THINK in s.text and 0 < s.answer_tokens <= 5
        assert s.reasoning == s.reasoning.rstrip()  # the closing text brings its own spacing


def test_budget_forcing_extends_short_reasoning(llm):
    end = llm.tokenizer.token_to_id(END_THINK)
    with torch.no_grad():  # close the think block at once, every time
        llm.model.lm_head.weight[end] = 50 * llm.model.lm_head.weight.abs().max()
    out = generate_with_budget(llm, ["1 plus 2"], SamplingParams(n=2, temperature=1.0, seed=0), budget=30,
                               min_thinking=10, max_waits=2, answer_tokens=3)
    for s in out[0]:
        assert s.waits == 2 and s.reasoning.count("Wait") == 2 and not s.budget_hit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from common import small_checkpoint

    return small_checkpoint(tmp_path_factory.mktemp("generate") / "ckpt")


def test_cli_generate_votes_marks_and_picks(checkpoint, capsys):
    """`r1kit generate` end to end: samples per prompt, the vote, each sample marked against --answer, best-of-n
    under a named reward, a 16-bit cache; and greedy samples that agree with each other and with a float32 cache."""
    import json

    from r1kit.cli import main

    argv = ["generate", str(checkpoint), "1+2", "3+4", "--n", "4", "--max-tokens", "12", "--seed", "1", "--json"]
    assert main(argv + ["--vote", "--answer", "3", "--best-of-n", "format=1", "--kv-cache-dtype", "bfloat16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["prompt"] for e in out] == ["1+2", "3+4"]
    for e in out:
        assert len(e["samples"]) == 4 and all(s["correct"] in (0.0, 1.0) for s in e["samples"])
        assert e["majority"] in [s["answer"] for s in e["samples"]] + [None] and 0 <= e["majority_share"] <= 1
        assert e["majority_correct"] in (0.0, 1.0)
        assert len(e["best_scores"]) == 4 and e["best_scores"][e["best"]] == max(e["best_scores"])
    greedy = ["generate", str(checkpoint), "1+2", "--n", "2", "--temperature", "0", "--max-tokens", "12", "--json"]
    assert main(greedy) == 0
    texts = [s["text"] for s in json.loads(capsys.readouterr().out)[0]["samples"]]
    assert main(greedy + ["--kv-cache-dtype", "float32"]) == 0
    assert texts[0] == texts[1] == json.loads(capsys.readouterr().out)[0]["samples"][0]["text"]
    assert main(greedy + ["--thinking-budget", "4"]) == 0  # the budget path: reasoning capped, then an answer
    assert len(json.loads(capsys.readouterr().out)[0]["samples"]) == 2
    # the prompts after the options, as one naturally types them; an unknown option is still an error
    assert main(["generate", str(checkpoint), "--n", "2", "--temperature", "0", "--max-tokens", "12", "--json",
                 "1+2"]) == 0
    assert [s["text"] for s in json.loads(capsys.readouterr().out)[0]["samples"]] == texts
    with pytest.raises(SystemExit):
        main(["generate", str(checkpoint), "--json", "1+2", "--bogus"])
    assert "unrecognized arguments: --bogus\n" in capsys.readouterr().err


def test_cli_generate_renders_the_named_template_with_a_system_message(checkpoint, capsys, monkeypatch):
    """--template and --system: the prompts reach the engine rendered by that template, system message first; an
    unknown template name is an error that names it."""
    from r1kit import tokenizer as T
    from r1kit.cli import main
    from r1kit.engine import LLM

    seen = []
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, *a, **k: seen.append(prompts) or generate(
        self, prompts, *a, **k))
    argv = ["generate", str(checkpoint), "1+2", "--max-tokens", "4", "--json"]
    assert main(argv + ["--template", "r1-zero", "--system", "Solve it step by step."]) == 0
    chat = [{"role": "system", "content": "Solve it step by step."}, {"role": "user", "content": "1+2"}]
    want = T.load(checkpoint).apply_chat_template(chat, add_generation_prompt=True, chat_template="r1-zero")
    assert seen[-1] == [want] and want.endswith(" User: 1+2 Assistant:")
    assert main(argv) == 0  # the checkpoint's own (R1's) otherwise
    assert seen[-1] == [T.load(checkpoint).apply_chat_template(chat[1:], add_generation_prompt=True)] != [want]
    capsys.readouterr()
    assert main(argv + ["--template", "r2"]) == 2
    assert "'r2' is not a chat template" in capsys.readouterr().err


def test_cli_min_thinking_without_a_budget_is_an_error(capsys):
    from r1kit.cli import main

    assert main(["generate", "no-model-needed", "1 plus 2", "--min-thinking", "5"]) == 2
    err = capsys.readouterr().err
    assert "--min-thinking" in err and "--thinking-budget" in err
