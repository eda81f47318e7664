"""GRPO: reinforcement learning with verifiable rewards (DeepSeekMath eq. 3; DeepSeek-R1 §2.2), with the
refinements that became standard after R1. Option names are TRL's `GRPOConfig`'s.

One step, as a linear program:
1. Rollout. Prompts of the task, rendered by the chat template, each sampled `num_generations` times by
   r1kit's engine on the live weights (`LLM(model)`: no copy; the prompt is prefilled once and fanned out).
   Each prompt draw has its own sampling seed (seed, draw index), so a resumed run samples what the
   interrupted one would have. With `dynamic_sampling` (DAPO §3.2), groups whose rewards are all equal carry
   no gradient and are dropped, and more prompts are sampled until the batch is full (at most
   `max_num_gen_batches` rounds; then the batch is topped up with dropped groups).
2. Scoring. Rewards by name (`rewards.Scorer`: accuracy, format, language, overlong, length, in worker processes
   with deadlines) and/or Python callables, weighted and summed; advantages A_i = (R_i - mean) / std per group
   (`scale_rewards`: group, batch, or none for Dr. GRPO).
3. Training: `num_iterations` (μ) optimizer steps on the batch, each over its micro-batches. The log-probs
   come from the training forward itself: on the first pass the ratio is exactly 1 (old = logp.detach(), so
   the gradient is REINFORCE with the group-mean baseline); later passes keep those as old log-probs. The
   loss is `rl.policy_loss`: clip / clip-higher (`epsilon`, `epsilon_high`), token- or sequence-level ratios
   (`importance_sampling_level`, GSPO), k3 KL to a reference model (`beta`, optionally refreshed every
   `ref_model_sync_steps` by mixing in the policy), and the aggregation of `loss_type`.

Logged per step: each reward's mean, accuracy, completion lengths, clip fraction, KL, entropy, the fraction
of zero-variance groups, tokens/s and the time split between generation, scoring and training.

    r1kit grpo --model runs/sft/model --task "addition?digits=3" --num_generations 8 --output_dir runs/grpo
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

import r1kit.model as M
from r1kit import rl, train
from r1kit.config import ConfigError


@dataclass
class GRPOConfig(train.TrainConfig):
    output_dir: str = "runs/grpo"
    model: str = ""  # the checkpoint directory to train (its tokenizer beside it, or --tokenizer)
    tokenizer: str | None = None
    task: str = "addition?digits=3"  # prompts with verifiable answers (tasks.load spec)
    chat_template: str | None = None  # r1, r1-zero (R1-Zero from a base model), jinja source; default: the tokenizer's
    per_device_train_batch_size: int = 8  # completions per micro-batch per process
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    # generation
    num_generations: int = 8  # G, samples per prompt
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    compile_decode: bool = False  # torch.compile the engine's decode step (tens of seconds once; see BENCHMARKS.md)
    # the objective
    beta: float = 0.0  # k3 KL coefficient (0: no reference model)
    sync_ref_model: bool = False  # refresh the reference: ref <- α·policy + (1-α)·ref every ref_model_sync_steps
    ref_model_sync_steps: int = 512
    ref_model_mixup_alpha: float = 0.6
    epsilon: float = 0.2  # clip range (lower)
    epsilon_high: float | None = None  # clip-higher's upper range (DAPO: 0.28); None = epsilon
    loss_type: str = "grpo"  # grpo (DeepSeekMath eq. 3) | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # μ: optimizer steps per rollout batch
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    mask_truncated_completions: bool = False  # completions cut by max_completion_length leave the loss
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups, sample more prompts until the batch is full
    max_num_gen_batches: int = 4  # generation rounds per step under dynamic sampling (0 = no limit)
    # rewards
    reward_funcs: Any = "accuracy=1,format=0.1"  # names (r1kit.rewards) with optional weights, and/or callables
    reward_weights: list[float] | None = None  # one per reward function, in order (overrides inline weights)
    overlong_buffer: int | None = None  # the "overlong" reward's soft window (DAPO §3.4); default max_completion/4
    reward_workers: int = 2  # processes that score named rewards
    log_completions: bool = False  # write each step's first completion to completions.jsonl

    def validate(self) -> None:
        super().validate()

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        need(bool(self.model), "model", "give the checkpoint directory to train")
        need(isinstance(self.num_generations, int) and self.num_generations >= 2, "num_generations",
             "must be an integer >= 2 (GRPO compares samples of one prompt)")
        per_rank = self.per_device_train_batch_size * self.gradient_accumulation_steps
        need(per_rank % self.num_generations == 0, "num_generations",
             f"must divide per_device_train_batch_size * gradient_accumulation_steps = {per_rank} (whole groups per "
             f"process and step)")
        need(self.max_completion_length >= 1, "max_completion_length", "must be >= 1")
        need(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (the ratio needs the sampling distribution)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be >= 0")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0 or None")
        need(self.loss_type in rl.LOSS_TYPES, "loss_type", f"must be one of {', '.join(rl.LOSS_TYPES)}")
        need(self.scale_rewards in rl.SCALE_REWARDS, "scale_rewards", f"must be one of {', '.join(rl.SCALE_REWARDS)}")
        need(self.importance_sampling_level in rl.IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
             f"must be one of {', '.join(rl.IMPORTANCE_SAMPLING_LEVELS)}")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.max_num_gen_batches >= 0, "max_num_gen_batches", "must be >= 0 (0 = no limit)")
        need(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be >= 1")
        need(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "must be in [0, 1]")
        need(self.overlong_buffer is None or 0 < self.overlong_buffer <= self.max_completion_length,
             "overlong_buffer", "must be in [1, max_completion_length]")
        need(self.reward_workers >= 1, "reward_workers", "must be >= 1")
        names, fns, weights = reward_spec(self)  # raises on unknown names or a weight count mismatch
        need(bool(names or fns), "reward_funcs", "give at least one reward")


def reward_spec(cfg: GRPOConfig) -> tuple[dict[str, float], list[tuple[str, Callable, float]], list[float]]:
    """({name: weight} for r1kit.rewards, [(name, callable, weight)], all weights in order)."""
    from r1kit.rewards import REWARDS

    items = cfg.reward_funcs
    if isinstance(items, str) or callable(items):
        items = [items]
    entries: list[tuple[str, Any, float]] = []
    for item in items:
        if callable(item):
            entries.append((getattr(item, "__name__", "custom"), item, 1.0))
            continue
        for part in filter(None, (p.strip() for p in str(item).split(","))):
            name, _, w = part.partition("=")
            name = name.strip()
            if name not in REWARDS:
                raise ConfigError(f"reward_funcs: unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))} "
                                  f"or pass Python callables")
            try:
                entries.append((name, None, float(w) if w.strip() else 1.0))
            except ValueError:
                raise ConfigError(f"reward_funcs: weight {w!r} of {name!r} is not a number") from None
    if cfg.reward_weights is not None:
        if len(cfg.reward_weights) != len(entries):
            raise ConfigError(f"reward_weights={cfg.reward_weights!r}: {len(cfg.reward_weights)} weights for "
                              f"{len(entries)} reward functions ({', '.join(e[0] for e in entries)})")
        entries = [(n, f, float(w)) for (n, f, _), w in zip(entries, cfg.reward_weights)]
    named = {n: w for n, f, w in entries if f is None}
    fns = [(n, f, w) for n, f, w in entries if f is not None]
    return named, fns, [w for _, _, w in entries]


# ----------------------------------------------------------------------------------------------------------------
# The loss of one micro-batch


@dataclass
class MicroBatch:
    input_ids: Tensor  # (B, T) prompt + completion, right-padded
    starts: Tensor  # (B,) prompt lengths: completion token j sits at position starts + j
    completion_ids: Tensor  # (B, C)
    mask: Tensor  # (B, C) bool, the completion tokens that count
    advantages: Tensor  # (B,)
    old_logp: Tensor | None = None  # (B, C), from the first pass, for num_iterations > 1
    ref_logp: Tensor | None = None  # (B, C), beta > 0


class _Stash:
    """Where the loss leaves its log-probs for later passes (an object DDP passes through untouched)."""

    logp: Tensor | None = None


def completion_logits(model: M.Transformer, input_ids: Tensor, starts: Tensor, C: int) -> Tensor:
    """Logits (B, C, V) that predict completion tokens 0..C-1: the head runs only on the positions that matter."""
    h = model(input_ids, head=False)  # (B, T, D)
    B, T, D = h.shape
    idx = (starts[:, None] - 1 + torch.arange(C, device=h.device)).clamp(max=T - 1)  # (B, C)
    return model.lm_head(h.gather(1, idx[..., None].expand(B, C, D)))


def loss_fn(model: M.Transformer, mb: MicroBatch, stash: _Stash, num_items: Tensor | None, *, cfg: GRPOConfig):
    """rl.policy_loss on one micro-batch, scaled so that micro-batches sum to the step's loss."""
    logits = completion_logits(model, mb.input_ids, mb.starts, mb.completion_ids.shape[1]).float()  # (B, C, V)
    logp = rl.token_logprobs(logits, mb.completion_ids, cfg.temperature)  # (B, C)
    stash.logp = logp.detach()
    loss, m = rl.policy_loss(
        logp, mb.old_logp, mb.advantages, mb.mask, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta,
        ref_logp=mb.ref_logp, max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
    if cfg.loss_type != "dapo":  # dapo's normaliser already spans the step
        loss = loss / cfg.gradient_accumulation_steps
    with torch.no_grad():
        share = 1.0 / cfg.gradient_accumulation_steps  # metrics: the mean over micro-batches
        maskf = mb.mask.float()
        entropy = (rl.token_entropy(logits.detach(), cfg.temperature) * maskf).sum() / maskf.sum().clamp(min=1)
        parts = {"loss": loss.detach(), "entropy": entropy * share,
                 "clip_ratio": m["clip_ratio/region"] * share, "clip_ratio/low": m["clip_ratio/low"] * share,
                 "clip_ratio/high": m["clip_ratio/high"] * share, "ratio_mean": m["ratio_mean"] * share}
        if "kl" in m:
            parts["kl"] = m["kl"] * share
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Group:
    """One prompt and its G completions."""

    example: Any
    prompt_ids: list[int]
    completions: list[list[int]]
    finish: list[str]
    texts: list[str]
    rewards: Tensor  # (G,)
    parts: dict[str, list[float]]  # each reward's value per completion


class Prompts:
    """The endless, seeded, per-process stream of prompts: draw k of rank r is example perm_epoch[k*W + r]."""

    def __init__(self, task, tok, cfg: GRPOConfig, run: train.Run):
        self.task, self.tok, self.cfg, self.run = task, tok, cfg, run
        self.ids: dict[int, list[int]] = {}
        self.perm: tuple[int, Tensor] = (-1, torch.empty(0))

    def index(self, draw: int) -> int:
        g = draw * self.run.world_size + self.run.rank
        n = len(self.task)
        epoch = g // n
        if self.perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self.perm = (epoch, torch.randperm(n, generator=generator))
        return int(self.perm[1][g % n])

    def prompt(self, i: int) -> list[int]:
        if i not in self.ids:
            ids = self.tok.apply_chat_template(self.task[i].chat(), add_generation_prompt=True, tokenize=True,
                                               chat_template=self.cfg.chat_template)
            self.ids[i] = ids[-self.cfg.max_prompt_length:]
        return self.ids[i]


def score(groups_raw: list[tuple], cfg: GRPOConfig, scorer, fns, weights_named: dict[str, float]) \
        -> list[tuple[Tensor, dict[str, list[float]]]]:
    """Rewards (G,) and per-reward values for each group of (example, prompt_ids, completions, texts)."""
    texts = [t for _, _, _, ts in groups_raw for t in ts]
    examples = [ex for ex, _, cs, _ in groups_raw for _ in cs]
    comp_ids = [c for _, _, cs, _ in groups_raw for c in cs]
    lengths = [len(c) for c in comp_ids]
    N = len(texts)
    total = torch.zeros(N, dtype=torch.float64)
    parts: dict[str, list[float]] = {}
    if scorer is not None:
        rows = scorer.score(texts, examples, num_tokens=lengths)
        for name, w in weights_named.items():
            vals = [r[name] for r in rows]
            parts[name] = vals
            total += w * torch.tensor(vals, dtype=torch.float64)
    for name, fn, w in fns:
        vals = fn(completions=texts, completion_ids=comp_ids, prompts=[ex.chat() for ex in examples],
                  answer=[ex.answer for ex in examples], examples=examples)
        vals = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in vals]
        if len(vals) != N:
            raise train.TrainingError(f"reward function {name!r} returned {len(vals)} values for {N} completions")
        parts[name] = vals
        total += w * torch.tensor(vals, dtype=torch.float64)
    out, k = [], 0
    for _, _, cs, _ in groups_raw:
        G = len(cs)
        out.append((total[k: k + G].float(), {n: v[k: k + G] for n, v in parts.items()}))
        k += G
    return out


def rollout(llm, prompts: Prompts, draw: int, cfg: GRPOConfig, scorer, fns, weights_named,
            stop_ids: list[int]) -> tuple[list[Group], int, dict[str, float]]:
    """Sample and score whole groups until this process has its share of the batch.

    Returns (groups, the next draw index, metrics: rounds, zero-variance fraction, generation/scoring seconds)."""
    from r1kit.engine import SamplingParams

    G = cfg.num_generations
    need = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // G
    kept: list[Group] = []
    spare: list[Group] = []
    seen = zero = rounds = 0
    gen_s = score_s = 0.0
    gen_tokens = 0
    while len(kept) < need:
        rounds += 1
        ask = need - len(kept)
        if cfg.dynamic_sampling and seen:  # expect the same share of zero-variance groups as so far
            keep_rate = max((seen - zero) / seen, 1 / 8)
            ask = min(4 * need, math.ceil(ask / keep_rate))
        idx = [prompts.index(draw + i) for i in range(ask)]
        params = [SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 max_tokens=cfg.max_completion_length, stop_token_ids=stop_ids,
                                 seed=(cfg.seed * 1_000_003 + (draw + i) * 7_919 + prompts.run.rank) % 2**61)
                  for i in range(ask)]
        draw += ask
        t0 = time.perf_counter()
        outs = llm.generate([prompts.prompt(i) for i in idx], params)
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        raw = []
        for i, out in zip(idx, outs):
            comps = [list(o.token_ids) for o in out.outputs]
            gen_tokens += sum(len(c) for c in comps)
            texts = [prompts.tok.decode([t for t in c if t not in stop_ids], skip_special_tokens=True) for c in comps]
            finish = [o.finish_reason for o in out.outputs]
            raw.append((prompts.task[i], list(out.prompt_token_ids), comps, texts, finish))
        scored = score([r[:4] for r in raw], cfg, scorer, fns, weights_named)
        score_s += time.perf_counter() - t0
        for (ex, p_ids, comps, texts, finish), (rewards, parts) in zip(raw, scored):
            group = Group(ex, p_ids, comps, finish, texts, rewards, parts)
            seen += 1
            flat = bool((rewards == rewards[0]).all())
            zero += flat
            (spare if cfg.dynamic_sampling and flat else kept).append(group)
        if cfg.max_num_gen_batches and rounds >= cfg.max_num_gen_batches and len(kept) < need:
            kept += spare[: need - len(kept)]
            break
    metrics = {"generation_rounds": rounds, "frac_zero_variance": zero / max(seen, 1), "generation_s": gen_s,
               "scoring_s": score_s, "generated_tokens": gen_tokens}
    return kept[:need], draw, metrics


def micro_batches(groups: list[Group], advantages: Tensor, cfg: GRPOConfig, pad_id: int, device) -> list[MicroBatch]:
    """Flatten the groups' completions (group-contiguous) into micro-batches of per_device_train_batch_size rows."""
    rows = [(g.prompt_ids, c, f) for g in groups for c, f in zip(g.completions, g.finish)]
    out = []
    B = cfg.per_device_train_batch_size
    for s in range(0, len(rows), B):
        chunk = rows[s: s + B]
        T = max(len(p) + len(c) for p, c, _ in chunk)
        C = max(1, max(len(c) for _, c, _ in chunk))
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        comp = torch.full((len(chunk), C), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), C, dtype=torch.bool)
        starts = torch.zeros(len(chunk), dtype=torch.long)
        for i, (p, c, finish) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = not (cfg.mask_truncated_completions and finish == "length")
            starts[i] = len(p)
        out.append(MicroBatch(ids.to(device), starts.to(device), comp.to(device), mask.to(device),
                              advantages[s: s + B].to(device)))
    return out


def advantages_of(groups: list[Group], cfg: GRPOConfig, run: train.Run) -> Tensor:
    rewards = torch.cat([g.rewards for g in groups])  # (N,)
    if cfg.scale_rewards == "batch" and run.distributed:  # the std of the whole batch, over every process
        s = train.global_sum([rewards.numel(), rewards.double().sum(), (rewards.double() ** 2).sum()], run)
        n, total, sq = s.tolist()
        std = math.sqrt(max(sq - total * total / n, 0.0) / max(n - 1, 1))
        return rl.group_advantages(rewards, cfg.num_generations, "none") / (std + 1e-4)
    return rl.group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)


# ----------------------------------------------------------------------------------------------------------------
# The program


def grpo(config: GRPOConfig | dict | None = None, *, on_step=None, **overrides) -> dict:
    """Train with GRPO and return {"model": final model dir, "step": steps done, "reward": last mean reward}.

    `reward_funcs` may hold Python callables, called as f(completions=[str], completion_ids=[[int]],
    prompts=[messages], answer=[str], examples=[tasks.Example]) -> [float] (TRL's keyword style: take **kwargs).
    `on_step(step, metrics)`: as in `r1kit.pretrain.pretrain` (called once the rollout batch is done)."""
    return train.run_stage(GRPOConfig, "grpo", _grpo, config, on_step, overrides)


def _grpo(cfg: GRPOConfig, run: train.Run, on_step) -> dict:
    if run.distributed and cfg.parallel == "fsdp":
        raise ConfigError("parallel='fsdp': grpo generates with full weights on every process; use parallel=ddp")
    from r1kit import tasks
    from r1kit import tokenizer as T
    from r1kit.engine import LLM
    from r1kit.rewards import Scorer

    # 1. policy, tokenizer, reference, task, engine, scorer
    resume_dir = train.resume_model_dir(run)
    model = M.load(resume_dir or cfg.model, dtype=torch.float32, device=run.device)
    tok = T.load(cfg.tokenizer or resume_dir or cfg.model)
    if cfg.chat_template:  # saved as the policy's default: it is served with the template it was trained on
        try:
            tok.set_default_template(cfg.chat_template)
        except ValueError as e:
            raise ConfigError(f"chat_template: {e}") from None
    model.tokenizer = tok
    train.freeze(model.mtp)  # RL trains the main model; the MTP modules stay as they were
    model.train()
    ref = None
    if cfg.beta > 0:
        ref_dir = resume_dir.parent / "ref_model" if resume_dir is not None and cfg.sync_ref_model else cfg.model
        ref = M.load(ref_dir, dtype=torch.float32, device=run.device).eval().requires_grad_(False)
    task = tasks.load(cfg.task)
    if not len(task):
        raise ConfigError(f"task={cfg.task!r}: no examples")
    prompts = Prompts(task, tok, cfg, run)
    G = cfg.num_generations
    per_rank = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    longest_prompt = min(cfg.max_prompt_length, model.config.max_position_embeddings - cfg.max_completion_length)
    if longest_prompt < 1:
        raise ConfigError(f"max_completion_length={cfg.max_completion_length}: leaves no room for a prompt in the "
                          f"model's context of {model.config.max_position_embeddings}")
    cfg.max_prompt_length = longest_prompt
    max_seqs = per_rank * (4 if cfg.dynamic_sampling else 1)
    # The engine decodes no text (the trainer decodes each finished completion once) and stops on EOS ids. No
    # prefix caching: the weights change every step (and the fused AdamW update does not bump the parameters'
    # version counters the engine watches), and a prefill that never depends on earlier requests keeps a
    # resumed run bit-identical. Each prompt is still prefilled once for its num_generations samples.
    # On CPU the engine packs the projections for its batched decode steps (a second copy of those weights), packed
    # anew before each rollout: the fused update moves no version counter.
    llm = LLM(model, max_num_seqs=max_seqs, max_model_len=longest_prompt + cfg.max_completion_length + 1,
              enable_prefix_caching=False, compile=cfg.compile_decode, pack_weights=True)
    stop_ids = sorted(set(model.config.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    named, fns, _ = reward_spec(cfg)
    scorer = None
    if named:
        scorer = Scorer(named, num_workers=cfg.reward_workers, prefilled=tok.prefills_think,
                        max_tokens=cfg.max_completion_length,
                        cache_tokens=cfg.overlong_buffer or max(1, cfg.max_completion_length // 4))

    # 2. wrapper, optimizer, resume
    module = train.parallelize(train.Objective(model, partial(loss_fn, cfg=cfg)), run)
    opt = train.build_optimizer(module, cfg)
    sched = train.build_scheduler(opt, cfg)
    state, rank_state = train.restore(run, module, opt, sched)
    step = state.get("step", 0)
    draw = rank_state.get("rollout_position", 0)  # prompts this process has drawn
    run.print(f"grpo: {len(task)} prompts, {per_rank * run.world_size // G} x {G} completions per step on "
              f"{run.world_size} process(es), loss_type={cfg.loss_type}, beta={cfg.beta}"
              f"{', resuming at step ' + str(step) if step else ''} -> {run.out}")
    completions_log = open(run.out / "completions.jsonl", "a") if cfg.log_completions and run.is_main else None

    # 3. the loop: rollout, score, μ optimizer steps
    last: dict = {}
    try:
        with train.Logger(run, step, show=("reward", "loss", "completion_length")) as log:
            while step < cfg.max_steps:
                t_step = time.perf_counter()
                llm.refresh_weights()
                groups, draw, roll = rollout(llm, prompts, draw, cfg, scorer, fns, named, stop_ids)
                advantages = advantages_of(groups, cfg, run)
                batches = micro_batches(groups, advantages, cfg, tok.pad_token_id or 0, run.device)
                num_items = None
                if cfg.loss_type == "dapo":  # every token of the step weighs the same, over all ranks
                    tokens = float(sum(int(mb.mask.sum()) for mb in batches))
                    num_items = train.global_sum([tokens], run).to(torch.float32) / run.world_size
                    num_items = num_items.to(run.device)[0]
                t_train = time.perf_counter()
                if ref is not None:
                    with torch.no_grad(), run.autocast():
                        for mb in batches:
                            logits = completion_logits(ref, mb.input_ids, mb.starts, mb.completion_ids.shape[1])
                            mb.ref_logp = rl.token_logprobs(logits.float(), mb.completion_ids, cfg.temperature)
                stashes = [_Stash() for _ in batches]
                train_metrics: list[dict] = []
                for it in range(cfg.num_iterations):
                    if step >= cfg.max_steps:
                        break
                    m = train.train_step(module, opt, sched, [(mb, st, num_items) for mb, st in zip(batches, stashes)],
                                         run, step)
                    if it == 0 and cfg.num_iterations > 1:
                        for mb, st in zip(batches, stashes):
                            mb.old_logp = st.logp
                    train.balance(model, cfg.bias_update_speed, run)
                    step += 1
                    train_metrics.append(m)
                    if ref is not None and cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                        _mix_into(ref, model, cfg.ref_model_mixup_alpha)
                train_s = time.perf_counter() - t_train
                step_s = time.perf_counter() - t_step
                batch_metrics = _batch_metrics(groups, roll, cfg, run, named, fns)
                batch_metrics.update(training_s=train_s, step_s=step_s,
                                     tokens_per_s=batch_metrics["completion_tokens"] / step_s,
                                     rollout_position=draw)
                first = step - len(train_metrics) + 1
                rows = [(first + k, {**m, **batch_metrics}) for k, m in enumerate(train_metrics)]
                for n, row in rows:
                    log.log(n, row)
                    last = row
                if completions_log is not None and groups:
                    import json

                    completions_log.write(json.dumps({"step": step, "prompt": groups[0].example.prompt,
                                                      "completion": groups[0].texts[0],
                                                      "reward": float(groups[0].rewards[0])}) + "\n")
                    completions_log.flush()
                crossed = cfg.save_steps and (step // cfg.save_steps) > ((step - len(train_metrics)) // cfg.save_steps)
                if step >= cfg.max_steps or crossed:
                    extra = {"ref_model": ref} if ref is not None and cfg.sync_ref_model else None
                    train.save_checkpoint(run, step, module, opt, sched, {}, rank_state={"rollout_position": draw},
                                          tokenizer=tok, extra_models=extra)
                if on_step is not None and run.is_main:  # after the checkpoint: a callback may stop the run here
                    for n, row in rows:
                        on_step(n, row)
    finally:
        if scorer is not None:
            scorer.close()
        if completions_log is not None:
            completions_log.close()
    final = train.save_final(run, module, tokenizer=tok)
    return {"model": str(final), "step": step, "reward": last.get("reward"), "output_dir": str(run.out)}


@torch.no_grad()
def _mix_into(ref: M.Transformer, model: M.Transformer, alpha: float) -> None:
    """TRL's reference refresh: ref <- alpha * policy + (1 - alpha) * ref."""
    for r, p in zip(ref.parameters(), model.parameters()):
        r.mul_(1 - alpha).add_(p.detach(), alpha=alpha)


def _batch_metrics(groups: list[Group], roll: dict, cfg: GRPOConfig, run: train.Run, named, fns) -> dict[str, float]:
    """Rollout statistics averaged over every process."""
    rewards = torch.cat([g.rewards for g in groups]).double()
    lengths = torch.tensor([len(c) for g in groups for c in g.completions], dtype=torch.float64)
    truncated = torch.tensor([f == "length" for g in groups for f in g.finish], dtype=torch.float64)
    names = list(named) + [n for n, _, _ in fns]
    per_reward = [torch.tensor([v for g in groups for v in g.parts[n]], dtype=torch.float64).mean() for n in names]
    vec = [rewards.mean(), rewards.std() if rewards.numel() > 1 else torch.tensor(0.0), lengths.mean(),
           truncated.mean(), *per_reward, roll["frac_zero_variance"], roll["generation_s"], roll["scoring_s"],
           roll["generation_rounds"]]
    s = train.global_sum([float(v) for v in vec], run) / run.world_size
    prompts = float(sum(len(g.prompt_ids) * len(g.completions) for g in groups))
    totals = train.global_sum([float(lengths.sum()), roll["generated_tokens"], prompts + float(lengths.sum())], run)
    vals = s.tolist()
    out = {"reward": vals[0], "reward_std": vals[1], "completion_length": vals[2], "truncated_frac": vals[3]}
    for i, n in enumerate(names):
        out[f"reward/{n}"] = vals[4 + i]
    if "accuracy" in named:
        out["accuracy"] = out["reward/accuracy"]
    k = 4 + len(names)
    out.update(frac_zero_variance=vals[k], generation_s=vals[k + 1], scoring_s=vals[k + 2],
               generation_rounds=vals[k + 3], completion_tokens=totals[0].item(),
               generated_tokens=totals[1].item(), tokens=totals[2].item())  # tokens: through each optimizer step
    return out
