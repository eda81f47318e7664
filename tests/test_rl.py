"""Tests for r1kit.rl: every number is checked against hand arithmetic, plain-Python loops, or an
independent autograd reference, never against the code under test."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit import rl

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------------------------------
# Log-probs and entropy


def test_token_logprobs_equals_log_softmax_gather_values_and_grads():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        fast = rl.token_logprobs(logits, tokens, temperature)
        slow = (logits / temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(fast, slow)
        w = torch.randn(3, 5, dtype=torch.float64)
        (g_fast,) = torch.autograd.grad((fast * w).sum(), logits)
        (g_slow,) = torch.autograd.grad((slow * w).sum(), logits)
        torch.testing.assert_close(g_fast, g_slow)


def test_token_logprobs_upcasts_bf16_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 4))
    out = rl.token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    ref = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)


def test_token_entropy_matches_categorical_and_uniform_is_log_vocab():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 9)
    ref = torch.distributions.Categorical(logits=logits / 0.5).entropy()
    torch.testing.assert_close(rl.token_entropy(logits, temperature=0.5), ref)
    torch.testing.assert_close(rl.token_entropy(torch.zeros(1, 2, 9)), torch.full((1, 2), math.log(9)))


# --------------------------------------------------------------------------------------------------
# Completion masks


def test_completion_mask_keeps_first_eos_and_drops_the_rest():
    EOS, PAD = 2, 0
    ids = torch.tensor([
        [5, 6, EOS, PAD, PAD],   # EOS at 2: keep 0..2
        [EOS, 7, EOS, 8, 9],     # EOS first: keep only it
        [5, 6, 7, 8, 9],         # truncated: keep all, unless masked
        [5, EOS, EOS, EOS, EOS], # padded with EOS: keep 0..1
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(rl.completion_mask(ids, EOS), expected)
    assert torch.equal(rl.is_truncated(ids, EOS), torch.tensor([False, False, True, False]))
    masked = expected.clone()
    masked[2] = False
    assert torch.equal(rl.completion_mask(ids, EOS, mask_truncated_completions=True), masked)
    # Several stop ids: 9 also ends a completion.
    assert torch.equal(rl.completion_mask(ids, [EOS, 9])[2], expected[2])
    assert torch.equal(rl.is_truncated(ids, [EOS, 9]), torch.tensor([False, False, False, False]))


@FAST
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_completion_mask_matches_loop(rows):
    eos = 3
    got = rl.completion_mask(torch.tensor(rows), eos)
    for row, got_row in zip(rows, got.tolist()):
        end = row.index(eos) if eos in row else len(row) - 1
        assert got_row == [t <= end for t in range(len(row))]


# --------------------------------------------------------------------------------------------------
# Advantages and dynamic sampling

REWARDS = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])  # 3 prompts x 4 generations


def test_group_advantages_by_hand():
    eps = 1e-4
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 1 constant; group 2: mean 0.25, std 0.5.
    s0 = math.sqrt(1 / 3)
    a, b = 0.5 / (s0 + eps), 0.75 / (0.5 + eps)
    expected = [a, -a, -a, a, 0, 0, 0, 0, -b / 3, -b / 3, -b / 3, b]
    got = rl.group_advantages(REWARDS, 4, "group", eps)
    torch.testing.assert_close(got, torch.tensor(expected))

    none = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
    torch.testing.assert_close(rl.group_advantages(REWARDS, 4, "none"), torch.tensor(none))

    batch_std = statistics.stdev(REWARDS.tolist())  # unbiased, over all 12
    batch = [x / (batch_std + eps) for x in none]
    torch.testing.assert_close(rl.group_advantages(REWARDS, 4, "batch", eps), torch.tensor(batch))


def test_group_advantages_rejects_bad_options():
    with pytest.raises(ValueError, match="scale_rewards"):
        rl.group_advantages(REWARDS, 4, "global")
    with pytest.raises(ValueError, match="num_generations"):
        rl.group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="num_generations"):
        rl.group_advantages(REWARDS, 5)


rewards_strategy = st.integers(2, 5).flatmap(lambda g: st.tuples(
    st.just(g), st.lists(st.floats(-10, 10, allow_nan=False), min_size=g, max_size=4 * g).map(
        lambda xs: xs[: len(xs) - len(xs) % g])))


@FAST
@given(rewards_strategy)
def test_advantages_sum_to_zero_per_group_and_are_shift_invariant(case):
    g, xs = case
    rewards = torch.tensor(xs, dtype=torch.float64)
    for scale in ("group", "none", "batch"):
        adv = rl.group_advantages(rewards, g, scale)
        torch.testing.assert_close(adv.view(-1, g).sum(1), torch.zeros(len(xs) // g, dtype=torch.float64))
        if scale != "batch":  # per-group shift changes the batch std
            shift = torch.arange(len(xs) // g, dtype=torch.float64).repeat_interleave(g) * 3.0
            torch.testing.assert_close(rl.group_advantages(rewards + shift, g, scale), adv)
    # A z-score with the unbiased std is bounded by (G-1)/sqrt(G).
    adv = rl.group_advantages(rewards, g, "group")
    assert adv.abs().max() <= (g - 1) / math.sqrt(g) + 1e-9


def test_zero_variance_groups_and_select():
    zv = rl.zero_variance_groups(REWARDS, 4)
    assert zv.tolist() == [False, True, False]
    rewards = torch.tensor([0.5, 0.5, 0.2, 0.7, -1.0, -1.0])
    assert rl.zero_variance_groups(rewards, 2).tolist() == [True, False, True]
    kept = rl.select_groups(torch.arange(12), ~zv, 4)
    assert kept.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    x = torch.randn(12, 3)
    assert torch.equal(rl.select_groups(x, ~zv, 4), torch.cat([x[:4], x[8:]]))


# --------------------------------------------------------------------------------------------------
# KL


def test_kl_k3_nonnegative_zero_at_equality_and_unbiased():
    torch.manual_seed(0)
    a, b = torch.randn(1000, dtype=torch.float64) * 3, torch.randn(1000, dtype=torch.float64) * 3
    assert (rl.kl_k3(a, b) >= 0).all()
    assert torch.equal(rl.kl_k3(a, a), torch.zeros_like(a))
    # E_{x~p}[k3(log p(x), log q(x))] = KL(p || q), exactly, over a full categorical.
    logp = torch.randn(7, dtype=torch.float64).log_softmax(0)
    logq = torch.randn(7, dtype=torch.float64).log_softmax(0)
    expected = sum(math.exp(p) * (p - q) for p, q in zip(logp.tolist(), logq.tolist()))
    assert abs((logp.exp() * rl.kl_k3(logp, logq)).sum().item() - expected) < 1e-12


# --------------------------------------------------------------------------------------------------
# The loss by hand: ratios [1.5, 1, 0.5] in both rows, A = [2, -1], row 1's last token masked.

LOGP = torch.zeros(2, 3)
OLD = -torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
ADV = torch.tensor([2.0, -1.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# Per-token loss -min(rA, clip(r, 0.8, 1.2) A):
#   row 0 (A=2):  r=1.5 -> -min(3, 2.4) = -2.4;  r=1 -> -2;  r=0.5 -> -min(1, 1.6) = -1.   sum -5.4
#   row 1 (A=-1): r=1.5 -> -min(-1.5, -1.2) = 1.5;  r=1 -> 1;  (masked).                    sum  2.5


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("grpo", {}, (-5.4 / 3 + 2.5 / 2) / 2),
    ("bnpo", {}, (-5.4 + 2.5) / 5),
    ("dapo", {}, (-5.4 + 2.5) / 5),
    ("dapo", {"num_items_in_batch": 10}, (-5.4 + 2.5) / 10),
    ("dr_grpo", {"max_completion_length": 4}, (-5.4 + 2.5) / (2 * 4)),
])
def test_policy_loss_by_hand(loss_type, kwargs, expected):
    loss, m = rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type, epsilon=0.2, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Only row 0's r=1.5 token is clipped (high); row 0's r=0.5 has A > 0 and row 1's is masked.
    assert m["clip_ratio/high"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/low"].item() == 0
    assert m["clip_ratio/region"].item() == pytest.approx(1 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 1.5 + 1) / 5)
    assert "kl" not in m


def test_clip_higher_moves_only_the_upper_bound_by_hand():
    # epsilon_high=0.6: row 0's r=1.5 is no longer clipped (-3 instead of -2.4); row 1 unchanged.
    loss, m = rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type="grpo", epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx((-6.0 / 3 + 2.5 / 2) / 2, abs=1e-6)
    assert m["clip_ratio/region"].item() == 0
    # A negative advantage with r=0.5 is clipped at the lower bound 0.8 with or without epsilon_high.
    mask = torch.tensor([[1, 1, 1], [1, 1, 1]])
    for eps_high in (None, 0.6):
        _, m = rl.policy_loss(LOGP, OLD, ADV, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=eps_high)
        assert m["clip_ratio/low"].item() == pytest.approx(1 / 6)


def test_policy_loss_with_kl_by_hand():
    ref = torch.tensor([[0.3, -0.2, 0.0], [1.0, -1.0, 5.0]])
    beta = 0.1
    per_token = [[-2.4, -2.0, -1.0], [1.5, 1.0, 0.0]]
    total, n, kl_sum = 0.0, 0, 0.0
    for i in range(2):
        for t in range(3):
            if MASK[i, t]:
                d = ref[i, t].item() - 0.0
                kl = math.exp(d) - d - 1
                total += per_token[i][t] + beta * kl
                kl_sum += kl
                n += 1
    loss, m = rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo", epsilon=0.2, beta=beta, ref_logp=ref)
    assert loss.item() == pytest.approx(total / n, abs=1e-6)
    assert m["kl"].item() == pytest.approx(kl_sum / n, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        rl.policy_loss(LOGP, OLD, ADV, MASK, beta=beta)


def test_gspo_by_hand():
    # Row 0: s = exp(mean(log 1.5, 0, log 0.5)) = 0.75**(1/3) ~ 0.909, inside [0.8, 1.2]: loss -2s per token.
    # Row 1 (2 tokens): s = exp(log(1.5) / 2) = sqrt(1.5) ~ 1.225 > 1.2, A < 0: min picks s*A, loss +s.
    s0, s1 = 0.75 ** (1 / 3), math.sqrt(1.5)
    ratio = rl.importance_ratio(LOGP, OLD, MASK, "sequence")
    torch.testing.assert_close(ratio, torch.tensor([[s0] * 3, [s1] * 3]))
    loss, m = rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type="grpo", epsilon=0.2,
                             importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-2 * s0 + s1) / 2, abs=1e-6)
    assert m["clip_ratio/region"].item() == 0
    with pytest.raises(ValueError, match="importance_sampling_level"):
        rl.policy_loss(LOGP, OLD, ADV, MASK, importance_sampling_level="seq")


def test_policy_loss_rejects_unknown_loss_type_and_missing_length():
    with pytest.raises(ValueError, match="loss_type"):
        rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        rl.policy_loss(LOGP, OLD, ADV, MASK, loss_type="dr_grpo")


# --------------------------------------------------------------------------------------------------
# Aggregations


def _random_case(seed, lengths, T=6, V=5, G=2):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T).expand(B, T) < torch.tensor(lengths).unsqueeze(1)
    rewards = torch.randint(0, 2, (B,), generator=g).double() + torch.rand(B, generator=g, dtype=torch.float64)
    adv = rl.group_advantages(rewards, G)
    return logits, tokens, mask, adv


def test_bnpo_equals_grpo_when_lengths_are_equal_but_not_otherwise():
    logits, tokens, mask, adv = _random_case(0, [4, 4, 4, 4])
    logp = rl.token_logprobs(logits, tokens)
    old = logp.detach() + 0.3 * torch.randn_like(logp)
    grpo, _ = rl.policy_loss(logp, old, adv, mask, loss_type="grpo")
    bnpo, _ = rl.policy_loss(logp, old, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(grpo, bnpo)
    logits, tokens, mask, adv = _random_case(0, [1, 6, 3, 5])
    logp = rl.token_logprobs(logits, tokens)
    grpo, _ = rl.policy_loss(logp, old, adv, mask, loss_type="grpo")
    bnpo, _ = rl.policy_loss(logp, old, adv, mask, loss_type="bnpo")
    assert abs(grpo.item() - bnpo.item()) > 1e-3


def test_dr_grpo_scaling():
    logits, tokens, mask, adv = _random_case(1, [1, 6, 3, 5])
    logp = rl.token_logprobs(logits, tokens)
    old = logp.detach() + 0.3 * torch.randn_like(logp)
    kw = dict(loss_type="dr_grpo", epsilon=0.2)
    dr8, _ = rl.policy_loss(logp, old, adv, mask, max_completion_length=8, **kw)
    dr16, _ = rl.policy_loss(logp, old, adv, mask, max_completion_length=16, **kw)
    bnpo, _ = rl.policy_loss(logp, old, adv, mask, loss_type="bnpo", epsilon=0.2)
    num_tokens, B = mask.sum().item(), 4
    torch.testing.assert_close(dr8, bnpo * num_tokens / (B * 8))
    torch.testing.assert_close(dr16, dr8 / 2)


def test_dapo_normalises_over_the_whole_step_across_micro_batches():
    # Two micro-batches of unequal token counts: "dapo" with the step's token count summed over them
    # equals one "bnpo" over the concatenation; averaging per-micro-batch "bnpo" does not.
    logits, tokens, mask, adv = _random_case(2, [1, 2, 6, 5])
    logp = rl.token_logprobs(logits, tokens).detach()
    old = logp + 0.3 * torch.randn_like(logp)
    whole, _ = rl.policy_loss(logp, old, adv, mask, loss_type="bnpo")
    n = mask.sum()
    parts = [rl.policy_loss(logp[s], old[s], adv[s], mask[s], loss_type="dapo", num_items_in_batch=n)[0]
             for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    bnpo_parts = [rl.policy_loss(logp[s], old[s], adv[s], mask[s], loss_type="bnpo")[0]
                  for s in (slice(0, 2), slice(2, 4))]
    assert abs(((bnpo_parts[0] + bnpo_parts[1]) / 2 - whole).item()) > 1e-3


# --------------------------------------------------------------------------------------------------
# Gradients


def _reinforce_grad(logits, tokens, mask, adv, weight_per_token):
    """Autograd reference: ∇ of -Σ_i Σ_t w_it · A_i · logp_it over masked tokens."""
    logp = (logits).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(-(weight_per_token * adv.unsqueeze(1) * logp * mask).sum(), logits)
    return grad


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_on_policy_gradient_is_reinforce_with_group_baseline(loss_type, level):
    """Ratio 1 (old = logp.detach()), beta 0: ∇loss = -Σ_i Σ_t w_it A_i ∇logp_it, where w is the
    aggregation's per-token weight: grpo 1/(B|o_i|), bnpo and dapo 1/num_tokens, dr_grpo 1/(B·L).
    GSPO (sequence level) gives the same gradient: ∂s_i/∂logp_it = s_i/|o_i| = 1/|o_i|, and its |o_i|
    broadcast copies of -s_i A_i restore the factor |o_i|. With loss_type="grpo" both are
    -(1/B) Σ_i (A_i/|o_i|) Σ_t ∇logp_it, the length-normalised REINFORCE of DeepSeekMath eq. 3."""
    lengths, L = [1, 6, 3, 5], 8
    logits, tokens, mask, adv = _random_case(3, lengths)
    B, num_tokens = len(lengths), sum(lengths)
    lengths_B1 = torch.tensor(lengths, dtype=torch.float64).unsqueeze(1)
    weight = {"grpo": 1 / (B * lengths_B1), "bnpo": torch.tensor(1 / num_tokens),
              "dapo": torch.tensor(1 / num_tokens), "dr_grpo": torch.tensor(1 / (B * L))}[loss_type]
    logp = rl.token_logprobs(logits, tokens)
    loss, m = rl.policy_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, epsilon=0.2,
                             importance_sampling_level=level, max_completion_length=L)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, _reinforce_grad(logits, tokens, mask, adv, weight))
    assert m["clip_ratio/region"].item() == 0 and m["ratio_mean"].item() == pytest.approx(1)
    # old_logp=None means the same thing, gradient included.
    logp = rl.token_logprobs(logits, tokens)
    loss_none, _ = rl.policy_loss(logp, None, adv, mask, loss_type=loss_type, epsilon=0.2,
                                  importance_sampling_level=level, max_completion_length=L)
    torch.testing.assert_close(loss_none, loss)
    torch.testing.assert_close(torch.autograd.grad(loss_none, logits)[0], grad)


def test_masked_tokens_get_no_gradient():
    logits, tokens, mask, adv = _random_case(4, [1, 6, 3, 5])
    for level in ("token", "sequence"):
        logp = rl.token_logprobs(logits, tokens)
        old = logp.detach() + 0.1
        loss, _ = rl.policy_loss(logp, old, adv, mask, importance_sampling_level=level,
                                 beta=0.05, ref_logp=old - 0.2)
        (grad,) = torch.autograd.grad(loss, logits)
        assert (grad[~mask] == 0).all() and (grad[mask].abs().sum(-1) > 0).all()


def _grad_wrt_logp(log_ratio, adv, mask, **kw):
    logp = log_ratio.clone().requires_grad_(True)
    loss, _ = rl.policy_loss(logp, torch.zeros_like(logp), adv, mask, loss_type="bnpo", **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


def test_clipping_zeroes_the_gradient_exactly_where_it_should():
    ratios = torch.tensor([[1.25, 1.1, 0.75, 0.85]] * 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    g = _grad_wrt_logp(ratios.log(), adv, mask, epsilon=0.2)
    # A > 0: clipped above 1.2 (no gradient), pushed up elsewhere, even below 1 - eps.
    # A < 0: clipped below 0.8, pushed down elsewhere, even above 1 + eps.
    assert (g == 0).tolist() == [[True, False, False, False], [False, False, True, False]]
    # clip-higher (epsilon_high=0.3) frees r=1.25 with A > 0 and leaves the lower bound where it was.
    g_high = _grad_wrt_logp(ratios.log(), adv, mask, epsilon=0.2, epsilon_high=0.3)
    assert (g_high == 0).tolist() == [[False, False, False, False], [False, False, True, False]]
    # Unclipped tokens: ∂(-rA/n)/∂logp = -rA/n.
    torch.testing.assert_close(g_high, torch.where(g_high == 0, 0.0, -ratios * adv.unsqueeze(1) / 8))


def test_gspo_clips_whole_sequences():
    # Row 0: three token ratios within [0.8, 1.2] and one (1.3) above; token-level clipping silences
    # only that one, but the sequence ratio exp(mean log r) ~ 1.217 > 1.2 silences the whole sequence.
    log_ratio = torch.tensor([[math.log(1.19)] * 3 + [math.log(1.3)], [math.log(1.19)] * 4])
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    s0 = math.exp((3 * math.log(1.19) + math.log(1.3)) / 4)
    assert s0 > 1.2
    g = _grad_wrt_logp(log_ratio, adv, mask, epsilon=0.2, importance_sampling_level="sequence")
    assert (g[0] == 0).all()
    # Row 1, s = 1.19 (unclipped): ∂s/∂logp_t = s/|o| for each of its |o| = 4 broadcast copies of
    # -s·A / n_tokens, so each token gets -s·A/8, the same as token-level with every r_t = s.
    torch.testing.assert_close(g[1], torch.full((4,), -1.19 / 8))
    g_tok = _grad_wrt_logp(log_ratio, adv, mask, epsilon=0.2, importance_sampling_level="token")
    assert (g_tok[0] == 0).tolist() == [False, False, False, True]
