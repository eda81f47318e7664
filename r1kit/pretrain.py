"""Pretraining a base model: next-token loss + λ·MTP loss on packed token sequences, with the
auxiliary-loss-free balancing bias (DeepSeek-V3 §2.1.2, §2.2, §4).

- Sequence packing: documents become [BOS] text [EOS], concatenated into one stream and cut into rows of
  seq_len + 1 tokens; every position is trained (no padding). With `document_mask` (the default) each token
  attends only within its own document and positions restart at every BOS, so a packed document is read as it
  would be alone (short documents, as in the tiny recipe, otherwise see several unrelated problems before their
  own); without it, attention runs across documents as GPT-style packing does.
- Multi-token prediction (V3 §2.2, eq. 25): L = L_main + λ/D · Σ_k L_MTP^k, where depth k predicts the
  token k+1 ahead (V3 used λ = 0.3 for the first 10T tokens, then 0.1).
- After every optimizer step, each expert's selection bias moves by `bias_update_speed` towards balance
  (`r1kit.model.update_balancing_bias`, counts summed over micro-batches and ranks).

The batch of step s is a pure function of (seed, s): rows are visited in a seeded permutation per epoch,
so a resumed run (the data position is in the checkpoint) reads exactly the data it would have read.

    r1kit pretrain --model tiny --data "addition?digits=3&size=2000" --max_steps 200 --output_dir runs/pt
    torchrun --nproc_per_node 2 -m r1kit.cli pretrain ... --parallel fsdp
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import r1kit.model as M
from r1kit import train
from r1kit.config import PRESETS, ConfigError, ModelConfig, preset


@dataclass
class PretrainConfig(train.TrainConfig):
    output_dir: str = "runs/pretrain"
    model: str = "tiny"  # a preset (tiny, tiny-dense, ...), a config.json, or a checkpoint directory (its weights)
    model_overrides: str = ""  # JSON object of ModelConfig fields, e.g. '{"hidden_size": 128}'
    data: str = "addition?digits=3&size=2000"  # a .txt (documents split at blank lines), .jsonl/.parquet with
    # a "text" field, or a task spec (each problem with its worked solution)
    tokenizer: str | None = None  # a tokenizer directory; default: the checkpoint's, else a BPE trained on the data
    vocab_size: int = 1024  # of a tokenizer trained on the data
    seq_len: int = 256  # tokens per packed row
    document_mask: bool = True  # attend within each packed document only, positions restarting at its BOS
    mtp_weight: float = 0.3  # λ of the MTP loss (0 = off)
    bias_update_speed: float = 1e-3  # γ of the balancing bias update

    def validate(self) -> None:
        super().validate()
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len!r}: must be >= 2")
        if self.mtp_weight < 0:
            raise ConfigError(f"mtp_weight={self.mtp_weight!r}: must be >= 0")
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size={self.vocab_size!r}: must be >= 300 (256 bytes + special tokens)")
        if not self.model:
            raise ConfigError("model='': give a preset, a config.json or a checkpoint directory")


# ----------------------------------------------------------------------------------------------------------------
# Data


def documents(data: str) -> list[str]:
    """Plain-text documents from a file or a task spec."""
    path = Path(data)
    if path.suffix == ".txt" and path.exists():
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if path.suffix in (".jsonl", ".json", ".parquet") and path.exists():
        rows = _rows(path)
        if rows and all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            return [r["text"] for r in rows]
    from r1kit import tasks

    task = tasks.load(data)
    docs = []
    for ex in task:
        trace = task.trace(ex)
        docs.append(f"{ex.prompt}\n{trace}\nThe answer is {ex.answer}." if trace else
                    f"{ex.prompt}\nThe answer is {ex.answer}.")
    return docs


def _rows(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return data.get("data", []) if isinstance(data, dict) else data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pack(docs: list[str], tok, seq_len: int) -> Tensor:
    """[BOS] doc [EOS] for every document, concatenated and cut into rows (N, seq_len + 1)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream: list[int] = []
    for ids in tok.encode_batch(docs):
        stream += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ConfigError(f"seq_len={seq_len}: the data holds only {len(stream)} tokens, less than one row")
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def rows_at(rows: Tensor, start: int, count: int, seed: int) -> Tensor:
    """Rows start .. start+count-1 of the endless sequence that visits every row once per epoch, in a seeded order."""
    n = rows.shape[0]
    out, perms = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(perms[epoch][i % n])
    return rows[torch.stack(out)]


# ----------------------------------------------------------------------------------------------------------------
# Model and loss


def model_config(cfg: PretrainConfig, tok) -> ModelConfig:
    """The architecture to build: a preset or config.json, with the overrides and the tokenizer's vocabulary."""
    overrides = json.loads(cfg.model_overrides) if isinstance(cfg.model_overrides, str) and cfg.model_overrides \
        else dict(cfg.model_overrides or {})
    base = preset(cfg.model) if cfg.model in PRESETS else ModelConfig.load(cfg.model)
    fields = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, max_position_embeddings=max(base.max_position_embeddings, cfg.seq_len))
    return base.replace(**{**fields, **overrides})


def document_positions(x: Tensor, bos: int) -> tuple[Tensor, Tensor]:
    """(doc_ids, positions) of a packed batch x (B, T): a document starts at each BOS; the tokens before a
    row's first BOS (the tail of a document cut by the row boundary) form document 0 from position 0."""
    is_bos = x == bos
    idx = torch.arange(x.shape[1], device=x.device).expand_as(x)
    start = torch.where(is_bos, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return is_bos.cumsum(dim=1), idx - start


def loss_fn(model: M.Transformer, x: Tensor, y: Tensor, n_tokens: Tensor, mtp_weight: float, accum: int,
            bos: int | None = None):
    """Next-token CE (+ λ · mean MTP CE) summed over this micro-batch and divided by the step's tokens per rank.

    x, y (B, T): inputs and targets (-100 = ignored). n_tokens (1 + D,): the step's target counts per rank for the
    main head and each MTP depth. With `bos`, attention stays within documents (`document_positions`).
    """
    doc_ids, positions = document_positions(x, bos) if bos is not None else (None, None)
    h = model(x, positions=positions, head=False, doc_ids=doc_ids)  # (B, T, D)
    ce = F.cross_entropy(model.lm_head(h).flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
    loss = ce / n_tokens[0]
    parts = {"loss": loss.detach()}
    mtp = model.mtp_forward(h, x, positions, doc_ids) if mtp_weight > 0 and len(model.mtp) else []
    if mtp:
        ce_mtp = sum(F.cross_entropy(logits.flatten(0, 1).float(), y[:, k:].flatten(), ignore_index=-100,
                                     reduction="sum") / n_tokens[k]
                     for k, logits in enumerate(mtp, start=1)) / len(mtp)
        loss = loss + mtp_weight * ce_mtp
        parts["mtp_loss"] = ce_mtp.detach()
    aux = model.aux_loss()  # the optional sequence-wise balance loss (aux_loss_alpha > 0)
    if aux is not None:
        loss = loss + aux / accum
        parts["aux_loss"] = aux.detach() / accum
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# The program


def pretrain(config: PretrainConfig | dict | None = None, *, on_step=None, **overrides) -> dict:
    """Pretrain and return {"model": final model dir, "step": steps done, "loss": last loss}.

    `on_step(step, metrics)` is called on the main process after each step and its checkpoint (if one was due);
    raising from it stops the run, which the same call resumes.
    """
    return train.run_stage(PretrainConfig, "pretrain", _pretrain, config, on_step, overrides)


def _pretrain(cfg: PretrainConfig, run: train.Run, on_step) -> dict:
    from r1kit import tokenizer as T

    # 1. tokenizer, data, model (from the checkpoint being resumed, if any)
    docs = documents(cfg.data)
    resume_dir = train.resume_model_dir(run)
    source = resume_dir or (Path(cfg.model) if cfg.model not in PRESETS and Path(cfg.model).is_dir() else None)
    if cfg.tokenizer:
        tok = T.load(cfg.tokenizer)
    elif source is not None and (source / "tokenizer.json").exists():
        tok = T.load(source)
    else:
        tok = T.train_bpe(docs, vocab_size=cfg.vocab_size)
    rows = pack(docs, tok, cfg.seq_len)
    if source is not None:
        model = M.load(source, dtype=torch.float32)
    else:
        model = M.build(model_config(cfg, tok))
    if model.config.vocab_size < tok.vocab_size:
        raise ConfigError(f"tokenizer: {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{model.config.vocab_size}")
    model.tokenizer = tok
    if cfg.mtp_weight == 0:
        train.freeze(model.mtp)
    model.train()

    # 2. parallel wrapper, optimizer, schedule, resume
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * accum * run.world_size
    module = train.parallelize(train.Objective(model, partial(loss_fn, mtp_weight=cfg.mtp_weight, accum=accum,
                                                                   bos=tok.bos_token_id if cfg.document_mask else None)), run)
    opt = train.build_optimizer(module, cfg)
    sched = train.build_scheduler(opt, cfg)
    state, _ = train.restore(run, module, opt, sched)
    step = state.get("step", 0)
    position = state.get("data_position", 0)
    T_ = cfg.seq_len
    depths = len(model.mtp) if cfg.mtp_weight > 0 else 0
    # every target of a packed row counts: per rank, micro * accum rows of T - k targets for depth k
    n_tokens = torch.tensor([micro * accum * (T_ - k) for k in range(depths + 1)], dtype=torch.float32,
                            device=run.device)
    run.print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {rows.shape[0]} rows "
              f"of {T_} tokens, {global_batch} rows per step on {run.world_size} process(es), "
              f"{'resuming at step ' + str(step) if step else 'from scratch'} -> {run.out}")

    # 3. the loop
    last = {}
    with train.Logger(run, step, show=("loss", "mtp_loss", "lr")) as log:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = rows_at(rows, position, global_batch, cfg.seed)[train.rank_slice(global_batch, run)]
            batch = batch.to(run.device)
            micro_batches = [(b[:, :-1], b[:, 1:], n_tokens) for b in batch.split(micro)]
            metrics = train.train_step(module, opt, sched, micro_batches, run, step)
            metrics.update(train.balance(model, cfg.bias_update_speed, run))
            step += 1
            position += global_batch
            elapsed = time.perf_counter() - t0
            metrics.update(tokens=global_batch * T_, tokens_per_s=global_batch * T_ / elapsed, step_s=elapsed,
                           data_position=position)
            log.log(step, metrics)
            last = metrics
            if train.should_save(step, cfg):
                train.save_checkpoint(run, step, module, opt, sched, {"data_position": position}, tokenizer=tok)
            if on_step is not None and run.is_main:  # after the checkpoint: a callback may stop the run here
                on_step(step, metrics)
    final = train.save_final(run, module, tokenizer=tok)
    return {"model": str(final), "step": step, "loss": last.get("loss"), "output_dir": str(run.out)}
