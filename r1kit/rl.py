"""GRPO mathematics as pure functions on tensors: log-probs, advantages, KL, ratios, loss aggregations.

No model, no trainer, no I/O: `r1kit/grpo.py` generates, scores and calls these. Option names follow
TRL's `GRPOConfig` (`num_generations`, `beta`, `epsilon`, `epsilon_high`, `loss_type`,
`scale_rewards`, `importance_sampling_level`, `mask_truncated_completions`, `max_completion_length`).

What each piece implements:

- GRPO (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300, eq. 3; used unchanged by DeepSeek-R1,
  arXiv:2501.12948, §2.2.1). For each prompt, sample G completions o_1..o_G and maximise
      1/G Σ_i 1/|o_i| Σ_t [ min(r_it·A_i, clip(r_it, 1-ε, 1+ε)·A_i) - β·KL_it ],
      r_it = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t),
  with the outcome advantage A_i = (R_i - mean(R)) / std(R) over the group (DeepSeekMath §4.1.2).
  `policy_loss` returns the negation, to be minimised.
- k3 KL estimator (DeepSeekMath eq. 4; Schulman, "Approximating KL Divergence", 2020):
      KL_it = exp(ref - logp) - (ref - logp) - 1,
  non-negative per token and unbiased for KL(π_θ || π_ref) when tokens are sampled from π_θ.
- DAPO (Yu et al. 2025, arXiv:2503.14476): clip-higher (a separate, larger upper bound
  `epsilon_high`, e.g. ε_low 0.2, ε_high 0.28), token-level loss (every token of the step weighs the
  same, `loss_type="dapo"`), and dynamic sampling (drop groups whose rewards are all equal, since
  their advantages and gradients are zero: `zero_variance_groups`, `select_groups`).
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783): remove the
  1/|o_i| length normaliser (it rewards long wrong answers less per token, so they grow) and the
  1/std(R) scaling (it over-weights too-easy and too-hard prompts): `loss_type="dr_grpo"` divides by
  the constant num_sequences · max_completion_length, and `scale_rewards="none"`.
- GSPO (Zheng et al. 2025, arXiv:2507.18071): one importance ratio per sequence,
  s_i = exp(1/|o_i| Σ_t (logp_it - old_logp_it)), clipped per sequence and broadcast to its tokens
  (`importance_sampling_level="sequence"`; the paper's objective is that with `loss_type="grpo"`).

Conventions. Completions are flattened to N = num_prompts · num_generations rows, each prompt's
group contiguous (rows g·G .. g·G + G - 1). Per-token tensors are (N, T) over completion tokens only;
`mask` is 1 on tokens that count. Log-probs are float32 (or float64 if given).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


# ---------------------------------------------------------------------------------------------------
# Log-probabilities and entropy


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(tokens) under softmax(logits / temperature), one value per position.

    logits (B, T, V) must already be aligned with tokens (B, T): logits[:, t] is the distribution
    the model used to pick tokens[:, t] (for a causal LM, pass logits[:, P-1:-1] for completion
    tokens that start at position P). Use the sampling temperature so that the ratios are between
    the distributions that actually generated the tokens.

    Memory: one row of the batch at a time, in float32, as gather - logsumexp; the full (B, T, V)
    log_softmax is never materialised (with bf16 logits only one (T, V) float32 row lives at once).
    """
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for logits_TV, tokens_T in zip(logits, tokens):
        logits_TV = logits_TV.to(out_dtype)
        if temperature != 1.0:
            logits_TV = logits_TV / temperature
        picked_T = logits_TV.gather(-1, tokens_T.unsqueeze(-1)).squeeze(-1)
        rows.append(picked_T - logits_TV.logsumexp(-1))
    return torch.stack(rows)  # (B, T)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy in nats of softmax(logits / temperature) at each position: (B, T, V) -> (B, T)."""
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for logits_TV in logits:
        logits_TV = logits_TV.to(out_dtype)
        if temperature != 1.0:
            logits_TV = logits_TV / temperature
        logp_TV = logits_TV.log_softmax(-1)
        rows.append(-(logp_TV.exp() * logp_TV).sum(-1))
    return torch.stack(rows)  # (B, T)


# ---------------------------------------------------------------------------------------------------
# Completion masks


def completion_mask(
    completion_ids: Tensor, eos_token_id: int | Sequence[int], mask_truncated_completions: bool = False
) -> Tensor:
    """Bool mask (B, T) of the completion tokens that count in the loss.

    Everything up to and including the first EOS is kept; everything after it (padding, or tokens a
    batch decoder produced past the end) is masked out. The EOS itself stays in: learning *when* to
    stop is part of the policy. `eos_token_id` may be several stop ids (e.g. <|im_end|> and
    <|endoftext|>). With `mask_truncated_completions` (DAPO's overlong filtering), a completion with
    no EOS, cut off by max_completion_length, is masked out entirely: its reward judges an unfinished
    answer, and training on it would punish reasoning for being long rather than for being wrong.
    """
    is_eos_BT = torch.isin(completion_ids, torch.as_tensor(eos_token_id, device=completion_ids.device))
    eos_before_BT = is_eos_BT.long().cumsum(1) - is_eos_BT.long()  # EOS count strictly before t
    mask_BT = eos_before_BT == 0
    if mask_truncated_completions:
        mask_BT &= is_eos_BT.any(1, keepdim=True)
    return mask_BT


def is_truncated(completion_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """Bool (B,): completions that never produced EOS, i.e. hit max_completion_length."""
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device)
    return ~torch.isin(completion_ids, eos).any(1)


# ---------------------------------------------------------------------------------------------------
# Advantages and dynamic sampling


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations} must be at least 2 (GRPO compares samples)")
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} is not flat num_prompts * num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)  # (P, G)


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """Outcome advantages (N,) from rewards (N,), N = num_prompts · num_generations, groups contiguous.

    A_i = R_i - mean(group of i), then divided by (std + eps) where std is
      "group": the std of i's group (GRPO, DeepSeekMath §4.1.2),
      "batch": the std of all N rewards (more robust when a group is nearly constant),
      "none":  no scaling (Dr. GRPO: the std scaling biases towards too-easy/too-hard prompts).
    std is the unbiased (N-1) sample std, as torch.std and TRL use. Call this on the rewards gathered
    from all ranks, so that every group and the batch std are whole.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    rewards_PG = _groups(rewards, num_generations)
    advantages_PG = rewards_PG - rewards_PG.mean(1, keepdim=True)
    if scale_rewards == "group":
        advantages_PG = advantages_PG / (rewards_PG.std(1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages_PG = advantages_PG / (rewards.std() + eps)
    return advantages_PG.reshape(-1)  # (N,)


def zero_variance_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """Bool (P,): groups whose rewards are all equal. Their advantages are 0, so they give no gradient;
    DAPO's dynamic sampling drops them and samples more prompts; their fraction is worth logging."""
    rewards_PG = _groups(rewards, num_generations)
    return (rewards_PG == rewards_PG[:, :1]).all(1)


def select_groups(x: Tensor, keep: Tensor, num_generations: int) -> Tensor:
    """Rows of x (N, ...) whose group is kept; keep is bool (P,), e.g. ~zero_variance_groups(...)."""
    return x[keep.repeat_interleave(num_generations)]


# ---------------------------------------------------------------------------------------------------
# KL, ratios, the clipped surrogate, and the loss aggregations


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def importance_ratio(
    logp: Tensor, old_logp: Tensor, mask: Tensor, importance_sampling_level: str = "token"
) -> Tensor:
    """π_θ / π_old as (B, T): per token, or (GSPO) one per sequence, exp(masked mean of the token
    log-ratios), broadcast to the sequence's tokens. Gradients flow to every token of the sequence."""
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    log_ratio_BT = logp - old_logp
    if importance_sampling_level == "sequence":
        mask = mask.to(log_ratio_BT.dtype)
        log_ratio_B1 = (log_ratio_BT * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio_BT = log_ratio_B1.expand_as(log_ratio_BT)
    return torch.exp(log_ratio_BT)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float | None = None) -> Tensor:
    """Per-token PPO/GRPO loss (B, T): -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A), A (B,) per sequence.

    With A > 0 a ratio above 1+ε_high (and with A < 0 one below 1-ε_low) is clipped: the loss is
    constant there and gives no gradient. epsilon_high=None means the symmetric ε.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages_B1 = advantages.unsqueeze(-1)
    unclipped = ratio * advantages_B1
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages_B1
    return -torch.minimum(unclipped, clipped)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses (B, T) over masked tokens to a scalar.

      "grpo":    mean over each sequence's tokens, then mean over sequences (DeepSeekMath eq. 3).
                 A token of a short completion weighs more than one of a long completion.
      "bnpo":    sum over all tokens / number of tokens in this (local) batch.
      "dapo":    sum over all tokens / num_items_in_batch, the token count of the whole optimizer step.
                 This is DAPO's token-level loss: with gradient accumulation (and DDP), "bnpo"
                 normalises each micro-batch by its own token count, so micro-batches with fewer tokens
                 weigh each token more; "dapo" gives every token of the step the same weight. Pass the
                 active-token count summed over accumulation steps and ranks, divided by the world size
                 (DDP averages gradients over ranks). None falls back to the local count (= "bnpo").
      "dr_grpo": sum over all tokens / (B · max_completion_length): a constant normaliser, so no
                 length bias (Dr. GRPO).
    Sequences whose mask is all zero count in the "grpo" and "dr_grpo" denominators with loss 0.
    For "grpo"/"bnpo"/"dr_grpo" the trainer still divides by the gradient-accumulation steps.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    mask = mask.to(per_token_loss.dtype)
    masked_BT = per_token_loss * mask
    if loss_type == "grpo":
        return (masked_BT.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked_BT.sum() / mask.sum().clamp(min=1)
    if loss_type == "dapo":
        normaliser = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return masked_BT.sum() / normaliser
    if max_completion_length is None:
        raise ValueError('loss_type="dr_grpo" needs max_completion_length (its constant normaliser)')
    return masked_BT.sum() / (per_token_loss.shape[0] * max_completion_length)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss (to minimise) and detached metrics.

    logp (B, T): log-probs under the current policy, with grad. old_logp (B, T): under the policy that
    sampled, or None when num_iterations == 1 (then it is logp.detach(): the ratio is 1 but its
    gradient is ∇logp, so the loss gradient is REINFORCE with the group-mean baseline). advantages
    (B,), mask (B, T). beta > 0 adds β·k3 KL to ref_logp (B, T) per token before aggregation.

    Metrics (0-dim tensors, no host sync), fractions over masked tokens as in TRL:
      clip_ratio/low    ratio < 1-ε_low with A < 0 (clipped, no gradient)
      clip_ratio/high   ratio > 1+ε_high with A > 0
      clip_ratio/region either
      ratio_mean        mean importance ratio
      kl                mean k3 KL, when ref_logp is given
    """
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (log-probs under the reference model)")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logp is None:
        old_logp = logp.detach()

    ratio_BT = importance_ratio(logp, old_logp, mask, importance_sampling_level)
    per_token_loss_BT = clipped_surrogate(ratio_BT, advantages, epsilon, epsilon_high)
    kl_BT = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta != 0.0:
        per_token_loss_BT = per_token_loss_BT + beta * kl_BT
    loss = aggregate_loss(per_token_loss_BT, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        maskf = mask.to(ratio_BT.dtype)
        num_tokens = maskf.sum().clamp(min=1)

        def token_mean(x_BT: Tensor) -> Tensor:
            return (x_BT.to(maskf.dtype) * maskf).sum() / num_tokens

        advantages_B1 = advantages.unsqueeze(-1)
        low_BT = (ratio_BT < 1 - epsilon) & (advantages_B1 < 0)
        high_BT = (ratio_BT > 1 + epsilon_high) & (advantages_B1 > 0)
        metrics = {
            "clip_ratio/low": token_mean(low_BT),
            "clip_ratio/high": token_mean(high_BT),
            "clip_ratio/region": token_mean(low_BT | high_BT),
            "ratio_mean": token_mean(ratio_BT),
        }
        if kl_BT is not None:
            metrics["kl"] = token_mean(kl_BT)
    return loss, metrics
