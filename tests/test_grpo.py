"""Tests for r1kit.grpo, the trainer around r1kit.rl (whose formulas tests/test_rl.py checks by hand): the
gradient through a real model is REINFORCE with group-mean baselines on-policy, dynamic sampling fills the
batch, a short run raises an easy reward, a resumed run is bit-identical, and the CLI runs with named rewards."""

import json

import pytest
import torch

import r1kit.model as M
from r1kit import rl, train
from r1kit import tokenizer as T
from r1kit.config import ConfigError
from r1kit.grpo import GRPOConfig, MicroBatch, _Stash, grpo, loss_fn

from common import small_checkpoint

TASK = "addition?digits=2&size=100"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("grpo") / "base")


def digits(completions, **_):
    """An easy reward a random model can climb: the fraction of characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_options_are_validated_with_their_names(checkpoint, tmp_path):
    base = dict(model=str(checkpoint), reward_funcs=[digits])
    with pytest.raises(ConfigError, match=r"chat_template: 'r2' is not a chat template"):
        grpo(output_dir=str(tmp_path / "x"), task=TASK, chat_template="r2", progress=False, **base)
    with pytest.raises(ConfigError, match=r"num_generations=1: must be an integer >= 2"):
        train.make_config(GRPOConfig, num_generations=1, **base)
    with pytest.raises(ConfigError, match=r"num_generations=3: must divide .* = 8"):
        train.make_config(GRPOConfig, num_generations=3, **base)
    with pytest.raises(ConfigError, match=r"loss_type='ppo': must be one of grpo, bnpo, dr_grpo, dapo"):
        train.make_config(GRPOConfig, loss_type="ppo", **base)
    with pytest.raises(ConfigError, match=r"unknown reward 'speed'"):
        train.make_config(GRPOConfig, model=str(checkpoint), reward_funcs="accuracy,speed")
    with pytest.raises(ConfigError, match=r"reward_weights=\[1.0\]: 1 weights for 2 reward functions"):
        train.make_config(GRPOConfig, model=str(checkpoint), reward_funcs="accuracy,format", reward_weights=[1.0])


def test_on_policy_gradient_through_the_model_is_reinforce_with_group_baselines(checkpoint):
    """ratio 1, beta 0: the loss gradient equals -1/N sum_i A_i / |o_i| * grad log pi(o_i | q_i), with log pi
    computed here sequence by sequence, unpadded, from the plain forward (alignment, padding and masking checked)."""
    torch.manual_seed(0)
    model = M.load(checkpoint)
    G, V = 4, model.config.vocab_size
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (5, 3)]
    comps = [torch.randint(3, V, (n,)).tolist() for n in (4, 2, 6, 1, 3, 5, 2, 4)]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1])
    adv = rl.group_advantages(rewards, G)
    rows = [(prompts[i // G], c) for i, c in enumerate(comps)]
    T_ = max(len(p) + len(c) for p, c in rows)
    C_ = max(len(c) for c in comps)
    ids, comp = torch.zeros(8, T_, dtype=torch.long), torch.zeros(8, C_, dtype=torch.long)
    mask = torch.zeros(8, C_, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        comp[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    mb = MicroBatch(ids, torch.tensor([len(p) for p, _ in rows]), comp, mask, adv)
    cfg = train.make_config(GRPOConfig, model="x", reward_funcs=[digits], loss_type="grpo", temperature=0.7)
    loss, _ = loss_fn(model, mb, _Stash(), None, cfg=cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    surrogate = 0.0
    for i, (p, c) in enumerate(rows):
        x = torch.tensor([p + c])
        logp = (model(x)[0, len(p) - 1: len(p) + len(c) - 1] / 0.7).log_softmax(-1)
        logp = logp.gather(-1, torch.tensor(c)[:, None]).sum()
        surrogate = surrogate - adv[i] * logp / len(c) / 8
    want = torch.autograd.grad(surrogate, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(checkpoint, tmp_path):
    """Half the prompts get a constant reward (zero variance); with dynamic sampling every trained group
    still has varying rewards and the batch is full, at the cost of more generation rounds."""
    seen = []

    def half_constant(completion_ids, examples, **_):
        return [0.5 if int(ex.answer) % 2 else c[0] % 2 for c, ex in zip(completion_ids, examples)]

    def watch(step, m):
        seen.append(m)

    import r1kit.grpo as G

    batches = []
    original = G.micro_batches

    def spy(groups, *a, **k):
        batches.append([g.rewards for g in groups])
        return original(groups, *a, **k)

    G.micro_batches = spy
    try:
        grpo(model=str(checkpoint), output_dir=str(tmp_path / "ds"), task=TASK, reward_funcs=[half_constant],
             max_steps=3, num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
             max_completion_length=8, dynamic_sampling=True, max_num_gen_batches=0, progress=False, on_step=watch)
    finally:
        G.micro_batches = original
    assert len(batches) == 3
    for groups in batches:
        assert len(groups) == 4  # 16 completions = 4 full groups
        assert all(not bool((r == r[0]).all()) for r in groups)
    assert sum(m["frac_zero_variance"] for m in seen) / len(seen) > 0.25  # about half the prompts are flat
    assert any(m["generation_rounds"] > 1 for m in seen)


def test_a_short_run_raises_an_easy_reward(checkpoint, tmp_path):
    grpo(model=str(checkpoint), output_dir=str(tmp_path / "up"), task=TASK, reward_funcs=[digits], max_steps=20,
         num_generations=4, per_device_train_batch_size=8, max_completion_length=16, learning_rate=1e-2,
         progress=False)
    rows = train.read_metrics(tmp_path / "up")
    first, last = sum(r["reward"] for r in rows[:4]) / 4, sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.2, (first, last)
    for k in ("reward/digits", "completion_length", "clip_ratio", "entropy", "frac_zero_variance", "tokens_per_s",
              "generation_s", "scoring_s", "training_s"):
        assert k in rows[-1]


def test_resumed_run_is_bit_identical(checkpoint, tmp_path):
    """Everything stateful at once: KL to a reference refreshed by mixing, two updates per batch (old log-probs
    kept), clip-higher, the dapo normaliser, dynamic sampling; stopped two steps after a checkpoint."""
    kw = dict(model=str(checkpoint), task=TASK, reward_funcs=[digits], max_steps=8, num_generations=4,
              per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=10,
              learning_rate=1e-2, beta=0.05, sync_ref_model=True, ref_model_sync_steps=2, num_iterations=2,
              save_steps=4, epsilon_high=0.28, loss_type="dapo", dynamic_sampling=True, progress=False)
    grpo(output_dir=str(tmp_path / "a"), **kw)

    class Stop(Exception):
        pass

    def stop(step, _):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        grpo(output_dir=str(tmp_path / "b"), on_step=stop, **kw)
    grpo(output_dir=str(tmp_path / "b"), **kw)
    a, b = train.read_metrics(tmp_path / "a"), train.read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for k in ("loss", "kl", "reward", "clip_ratio", "grad_norm", "entropy"):
            assert x[k] == y[k], (x["step"], k)
    assert a[-1]["kl"] > 0 and a[-1]["ratio_mean"] != 1.0  # the reference and the second update mattered


def test_cli_with_named_rewards_scored_in_workers(checkpoint, tmp_path, capsys):
    from r1kit.cli import main

    rc = main(["grpo", "--model", str(checkpoint), "--task", TASK, "--out", str(tmp_path / "cli"),
               "--reward_funcs", "accuracy=1,format=0.5,overlong=0.1", "--num_generations", "4",
               "--per_device_train_batch_size", "4", "--max_steps", "2", "--max_completion_length", "8",
               "--mask_truncated_completions", "--chat_template", "r1-zero", "--no-progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert M.load(result["model"]).config.vocab_size == M.load(checkpoint).config.vocab_size
    # the policy is saved with the template it was trained on, which serving then applies by default
    chat = [{"role": "user", "content": "1+2"}]
    assert T.load(result["model"]).apply_chat_template(chat, add_generation_prompt=True) == T.load(
        checkpoint).apply_chat_template(chat, add_generation_prompt=True, chat_template="r1-zero")
    row = train.read_metrics(tmp_path / "cli")[-1]
    assert {"reward/accuracy", "reward/format", "reward/overlong", "accuracy"} <= set(row)
    # a truncated completion (8 of 8 tokens) is fully overlong (-1); the others are at most 0
    assert row["reward/overlong"] <= -row["truncated_frac"] + 1e-9 and row["truncated_frac"] > 0
    if row["truncated_frac"] == 1.0:  # every completion truncated, so masked out: nothing to learn from
        assert row["loss"] == 0.0 and row["clip_ratio"] == 0.0
