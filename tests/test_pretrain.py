"""Tests for r1kit.pretrain: packing, the MTP targets, the balancing bias, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import r1kit.model as M
from r1kit import config as C
from r1kit import train
from r1kit import tokenizer as T
from r1kit.pretrain import documents, loss_fn, pack, pretrain, rows_at

from common import SMALL

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model_overrides", json.dumps(SMALL), "--data", "addition?digits=3&size=200", "--seq_len", "32",
         "--vocab_size", "300", "--max_steps", "8", "--save_steps", "3", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "2", "--warmup_steps", "2", "--no-progress"]


def test_packing_keeps_every_token_and_visits_every_row_once_per_epoch():
    docs = ["12+34=46", "a b c", "What is 7+8?"]
    tok = T.train_bpe(documents("addition?digits=2&size=50"), vocab_size=300)
    rows = pack(docs * 5, tok, seq_len=7)  # (N, 8)
    stream = []
    for d in docs * 5:
        stream += [tok.bos_token_id] + tok.encode(d) + [tok.eos_token_id]
    assert rows.shape[1] == 8 and rows.flatten().tolist() == stream[: rows.numel()]
    n = rows.shape[0]
    epoch0, epoch1 = rows_at(rows, 0, n, seed=3), rows_at(rows, n, n, seed=3)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch0) == key(epoch1) == key(rows)  # each row exactly once per epoch
    assert torch.equal(rows_at(rows, 2, 5, seed=3), epoch0[2:7])  # any window of the stream is reproducible
    assert not torch.equal(epoch0, epoch1) or n < 3


def test_mtp_loss_predicts_the_token_two_ahead():
    torch.manual_seed(0)
    model = M.build(C.tiny(vocab_size=64, num_nextn_predict_layers=1, **SMALL))
    row = torch.randint(0, 64, (2, 9))  # a packed row: inputs row[:, :-1], targets row[:, 1:]
    x, y = row[:, :-1], row[:, 1:]
    n = torch.tensor([2 * 8, 2 * 7], dtype=torch.float32)
    loss, parts = loss_fn(model, x, y, n, mtp_weight=0.3, accum=1)
    h = model(x, head=False)
    mtp = model.mtp_forward(h, x)[0]  # (2, 7, V)
    by_hand = torch.stack([F.cross_entropy(mtp[:, i], row[:, i + 2]) for i in range(7)]).mean()
    main = torch.stack([F.cross_entropy(model.lm_head(h)[:, i], row[:, i + 1]) for i in range(8)]).mean()
    torch.testing.assert_close(parts["mtp_loss"], by_hand)
    torch.testing.assert_close(parts["loss"], main)
    torch.testing.assert_close(loss, main + 0.3 * by_hand)


def test_balancing_bias_moves_in_steps_of_the_speed(tmp_path):
    kw = dict(model_overrides=json.dumps(SMALL), data="addition?digits=3&size=200", seq_len=32, vocab_size=300,
              max_steps=5, per_device_train_batch_size=2, progress=False)
    out = pretrain(output_dir=str(tmp_path / "a"), bias_update_speed=0.01, **kw)
    bias = M.load(out["model"]).model.layers[1].mlp.gate.e_score_correction_bias
    k = bias / 0.01
    assert bias.abs().sum() > 0 and torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 5
    assert "max_violation" in train.read_metrics(tmp_path / "a")[0]
    frozen = pretrain(output_dir=str(tmp_path / "b"), bias_update_speed=0.0, **kw)
    assert M.load(frozen["model"]).model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


KILLER = textwrap.dedent("""
    import os, signal, sys
    import r1kit.train as train
    log = train.Logger.log
    def log_then_die(self, step, metrics):
        log(self, step, metrics)
        if step == 5:  # two steps after the checkpoint of step 3: its lines must be dropped on resume
            os.kill(os.getpid(), signal.SIGKILL)
    train.Logger.log = log_then_die
    from r1kit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    cmd = ["pretrain", "--output_dir", str(tmp_path / "run")] + FLAGS
    proc = subprocess.run([sys.executable, str(killer)] + cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_3"]
    assert [m["step"] for m in train.read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    # the same command again continues from step 3
    proc = subprocess.run([sys.executable, "-m", "r1kit.cli"] + cmd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # an uninterrupted run, in this process (one thread, as the subprocesses)
    from r1kit.train import parse_args
    from r1kit.pretrain import PretrainConfig

    pretrain(parse_args(PretrainConfig, ["--output_dir", str(tmp_path / "ref")] + FLAGS, "t", "t"))
    resumed, ref = train.read_metrics(tmp_path / "run"), train.read_metrics(tmp_path / "ref")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(ref, resumed):
        for k in ("loss", "mtp_loss", "grad_norm", "lr", "max_violation"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])  # bit for bit
    x, y = M.load(tmp_path / "ref" / "model").state_dict(), M.load(tmp_path / "run" / "model").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("preset", ["mla", "dense"])
def test_document_mask_reads_each_packed_document_as_if_alone(preset):
    from r1kit.pretrain import document_positions

    torch.manual_seed(0)
    cfg = C.tiny(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                 moe_intermediate_size=16, intermediate_size=32, max_position_embeddings=64) if preset == "mla" else \
        C.tiny_dense(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=32, max_position_embeddings=64)
    model = M.build(cfg).eval()
    BOS = 1
    tail, a, b = [7, 8, 9], [BOS, 10, 11, 12, 13], [BOS, 20, 21]  # a row: a cut document's tail, then two whole ones
    row = torch.tensor([tail + a + b])
    doc_ids, positions = document_positions(row, BOS)
    assert doc_ids.tolist() == [[0] * 3 + [1] * 5 + [2] * 3]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]]
    with torch.no_grad():
        packed = model(row, positions=positions, doc_ids=doc_ids)
        alone = torch.cat([model(torch.tensor([d])) for d in (tail, a, b)], dim=1)
        mtp_packed = model.mtp_forward(model(row, positions=positions, doc_ids=doc_ids, head=False), row, positions,
                                       doc_ids)[0] if len(model.mtp) else None
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    if mtp_packed is not None:  # MTP at the last position of a document sees the next one's BOS: compare inside
        h = model(torch.tensor([a]), head=False)
        torch.testing.assert_close(mtp_packed[:, 3:7], model.mtp_forward(h, torch.tensor([a]))[0], rtol=1e-5, atol=1e-5)
