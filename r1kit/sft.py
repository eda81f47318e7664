"""Supervised fine-tuning: conversations through the chat template, the loss on the assistant's tokens only.

The R1 recipe uses it twice (R1 paper §2.3.1 and §2.3.3, §2.4): the cold start, a few thousand long
chain-of-thought conversations that teach the reasoning format before RL, and distillation, where a small
dense model learns from conversations a reasoning model wrote. Either way the data is a task (`tasks.load`):
problems with a worked solution (`task.sft_messages`: the trace as reasoning, the boxed answer as content),
or files of conversations whose last turn is the assistant's.

- Each conversation is rendered by `Tokenizer.encode_sft`, the exact text the model is served with, and its
  loss mask is 1 on the assistant's tokens (the `{% generation %}` spans of the template).
- Packing (default): whole conversations are laid end to end in rows of `max_length` tokens (a new row when the
  next one does not fit), the remainder padded and ignored. Conversations longer than `max_length` are cut.
  As in GPT-style packing, a conversation attends to the ones before it in its row; `packing=false` gives each
  conversation a row of its own.
- The loss is the mean over every assistant token of the optimizer step (all micro-batches and ranks), so a
  step weighs each token the same however the tokens fall into micro-batches.

    r1kit sft --model runs/pretrain/model --data "addition?digits=3&size=2000" --max_steps 300 --output_dir runs/sft
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

import r1kit.model as M
from r1kit import train
from r1kit.config import ConfigError


@dataclass
class SFTConfig(train.TrainConfig):
    output_dir: str = "runs/sft"
    model: str = ""  # a checkpoint directory (its tokenizer beside it, or --tokenizer)
    tokenizer: str | None = None
    data: str = "addition?digits=3&size=2000"  # a task spec or a file of conversations (see docs/DATA.md)
    chat_template: str | None = None  # r1, r1-zero, or jinja source; default: the tokenizer's own (R1's if none)
    max_length: int = 512  # tokens per row (TRL's name)
    packing: bool = True
    num_train_epochs: float = 0.0  # > 0: max_steps is derived from it
    mtp_weight: float = 0.0  # > 0 also trains the MTP modules on the assistant tokens
    learning_rate: float = 1e-3

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("model='': give the checkpoint directory to fine-tune")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length!r}: must be >= 8")
        if self.num_train_epochs < 0:
            raise ConfigError(f"num_train_epochs={self.num_train_epochs!r}: must be >= 0")
        if self.mtp_weight < 0:
            raise ConfigError(f"mtp_weight={self.mtp_weight!r}: must be >= 0")


# ----------------------------------------------------------------------------------------------------------------
# Data


def conversations(data: str) -> list[list[dict]]:
    """Training conversations of a task spec or a data file."""
    from r1kit import tasks

    task = tasks.load(data)
    convs = [m for m in (task.sft_messages(ex) for ex in task) if m]
    if not convs:
        raise ConfigError(f"data={data!r}: no training conversations (a task needs worked solutions, a file a "
                          f"final assistant turn)")
    return convs


def encode(convs: list[list[dict]], tok, max_length: int, chat_template: str | None) -> list[tuple[list, list]]:
    """(ids, labels) per conversation: labels[t] is the token to predict at t, or -100 where not trained."""
    out = []
    for messages in convs:
        ids, mask = tok.encode_sft(messages, chat_template=chat_template)
        ids, mask = ids[:max_length], mask[:max_length]
        labels = [i if m else -100 for i, m in zip(ids[1:], mask[1:])] + [-100]
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    return out


def pack(encoded: list[tuple[list, list]], max_length: int, pad_id: int, packing: bool, seed: int) \
        -> tuple[Tensor, Tensor, Tensor]:
    """Rows (N, max_length) of ids and labels, and each row's used length (N,). Conversations are shuffled once
    (seeded), then packed whole in that order."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list, list]] = []
    for i in order:
        ids, labels = encoded[i]
        if packing and rows and len(rows[-1][0]) + len(ids) <= max_length:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(labels)
        else:
            rows.append((list(ids), list(labels)))
    N = len(rows)
    x = torch.full((N, max_length), pad_id, dtype=torch.long)
    y = torch.full((N, max_length), -100, dtype=torch.long)
    lengths = torch.zeros(N, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids)
        y[r, : len(labels)] = torch.tensor(labels)
        lengths[r] = len(ids)
    return x, y, lengths


# ----------------------------------------------------------------------------------------------------------------
# Loss


def loss_fn(model: M.Transformer, x: Tensor, y: Tensor, n_tokens: Tensor, mtp_weight: float):
    """Cross-entropy summed over this micro-batch's assistant tokens, divided by the step's count per rank.

    x, y (B, T); n_tokens (1 + D,): the step's trained-token counts per rank for the head and each MTP depth."""
    h = model(x, head=False)  # (B, T, D)
    ce = F.cross_entropy(model.lm_head(h).flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
    loss = ce / n_tokens[0]
    parts = {"loss": loss.detach()}
    mtp = model.mtp_forward(h, x) if mtp_weight > 0 and len(model.mtp) else []
    if mtp:
        ce_mtp = sum(F.cross_entropy(logits.flatten(0, 1).float(), y[:, k:].flatten(), ignore_index=-100,
                                     reduction="sum") / n_tokens[k].clamp(min=1)
                     for k, logits in enumerate(mtp, start=1)) / len(mtp)
        loss = loss + mtp_weight * ce_mtp
        parts["mtp_loss"] = ce_mtp.detach()
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# The program


def sft(config: SFTConfig | dict | None = None, *, on_step=None, **overrides) -> dict:
    """Fine-tune and return {"model": final model dir, "step": steps done, "loss": last loss}.

    `on_step(step, metrics)`: as in `r1kit.pretrain.pretrain`."""
    return train.run_stage(SFTConfig, "sft", _sft, config, on_step, overrides)


def _sft(cfg: SFTConfig, run: train.Run, on_step) -> dict:
    from r1kit import tokenizer as T
    from r1kit.pretrain import rows_at

    # 1. model, tokenizer, data
    source = train.resume_model_dir(run) or cfg.model
    model = M.load(source, dtype=torch.float32)
    tok = T.load(cfg.tokenizer or source)
    if cfg.chat_template:  # saved as the model's default: it is served with the template it was trained on
        try:
            tok.set_default_template(cfg.chat_template)
        except ValueError as e:
            raise ConfigError(f"chat_template: {e}") from None
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer: {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{model.config.vocab_size}")
    model.tokenizer = tok
    encoded = encode(conversations(cfg.data), tok, cfg.max_length, cfg.chat_template)
    if not encoded:
        raise ConfigError(f"max_length={cfg.max_length}: no conversation of data={cfg.data!r} has an assistant token "
                          f"within it (a longer max_length, or conversations with assistant turns)")
    x_all, y_all, lengths = pack(encoded, cfg.max_length, tok.pad_token_id or 0, cfg.packing, cfg.seed)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * accum * run.world_size
    if cfg.num_train_epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.num_train_epochs * x_all.shape[0] / global_batch))
    if cfg.mtp_weight == 0:
        train.freeze(model.mtp)
    model.train()

    # 2. wrapper, optimizer, resume
    module = train.parallelize(train.Objective(model, partial(loss_fn, mtp_weight=cfg.mtp_weight)), run)
    opt = train.build_optimizer(module, cfg)
    sched = train.build_scheduler(opt, cfg)
    state, _ = train.restore(run, module, opt, sched)
    step, position = state.get("step", 0), state.get("data_position", 0)
    depths = len(model.mtp) if cfg.mtp_weight > 0 else 0
    rows = torch.cat([x_all, y_all, lengths[:, None]], dim=1)  # one tensor, so rows_at can pick rows
    run.print(f"sft: {len(encoded)} conversations in {x_all.shape[0]} rows of <= {cfg.max_length} tokens, "
              f"{global_batch} rows per step, {cfg.max_steps} steps on {run.world_size} process(es)"
              f"{', resuming at step ' + str(step) if step else ''} -> {run.out}")

    # 3. the loop
    last: dict = {}
    L = cfg.max_length
    with train.Logger(run, step, show=("loss", "lr")) as log:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            picked = rows_at(rows, position, global_batch, cfg.seed)
            x, y, used = picked[:, :L], picked[:, L: 2 * L], picked[:, 2 * L]
            # the step's trained-token counts (all ranks), per rank: the normaliser of a token-mean over the step
            counts = [float((y[:, k:] != -100).sum()) for k in range(depths + 1)]
            n_tokens = torch.tensor(counts, dtype=torch.float32, device=run.device) / run.world_size
            mine = train.rank_slice(global_batch, run)
            x, y, used = x[mine], y[mine], used[mine]
            micro_batches = []
            for xs, ys, us in zip(x.split(micro), y.split(micro), used.split(micro)):
                width = int(us.max())  # trim each micro-batch to its longest row
                micro_batches.append((xs[:, :width].to(run.device), ys[:, :width].to(run.device), n_tokens))
            metrics = train.train_step(module, opt, sched, micro_batches, run, step)
            metrics.update(train.balance(model, cfg.bias_update_speed, run))
            step += 1
            position += global_batch
            elapsed = time.perf_counter() - t0
            tokens = float(used.sum()) * run.world_size
            metrics.update(tokens=tokens, tokens_per_s=tokens / elapsed, trained_tokens=counts[0],
                           step_s=elapsed, data_position=position)
            log.log(step, metrics)
            last = metrics
            if train.should_save(step, cfg):
                train.save_checkpoint(run, step, module, opt, sched, {"data_position": position}, tokenizer=tok)
            if on_step is not None and run.is_main:  # after the checkpoint: a callback may stop the run here
                on_step(step, metrics)
    final = train.save_final(run, module, tokenizer=tok)
    return {"model": str(final), "step": step, "loss": last.get("loss"), "output_dir": str(run.out)}
