"""Tests for r1kit.train, the parts every stage shares: configuration, optimizer, schedule, the NaN guard,
checkpoints, and the equivalence of two processes (DDP, FSDP2) with one process on the doubled batch."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import r1kit.model as M
from r1kit import config as C
from r1kit import train
from r1kit.config import ConfigError
from r1kit.pretrain import PretrainConfig, pretrain
from r1kit.sft import sft

from common import SMALL

ROOT = Path(__file__).resolve().parents[1]
PT = dict(model_overrides=json.dumps(SMALL), data="addition?digits=3&size=200", seq_len=32, vocab_size=300,
          progress=False)


# --------------------------------------------------------------------------------------------------------------
# Configuration


def test_config_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"parallel='tp'.*ddp, fsdp"):
        train.make_config(PretrainConfig, parallel="tp")
    with pytest.raises(ConfigError, match=r"lr_scheduler_type='exp'.*cosine, linear, constant"):
        train.make_config(PretrainConfig, lr_scheduler_type="exp")
    with pytest.raises(ConfigError, match=r"max_steps='ten': expected int"):
        train.make_config(PretrainConfig, max_steps="ten")
    with pytest.raises(ConfigError, match=r"unknown option.*'num_epochz'"):
        train.make_config(PretrainConfig, num_epochz=3)


def test_toml_file_then_flags_override_defaults(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('max_steps = 7\nlearning_rate = 0.5\n[pretrain]\nseq_len = 48\nmodel_overrides = "{}"\n')
    cfg = train.parse_args(PretrainConfig, ["--config", str(f), "--learning-rate", "0.25", "--no-progress",
                                            "--out", "x/y"], prog="t", description="t", aliases={"out": "output_dir"})
    assert (cfg.max_steps, cfg.seq_len, cfg.learning_rate, cfg.progress, cfg.output_dir) == (7, 48, 0.25, False, "x/y")
    assert cfg.warmup_steps == PretrainConfig().warmup_steps  # untouched fields keep their defaults


def test_schedule_warms_up_then_decays_to_the_floor_by_hand():
    cfg = train.make_config(PretrainConfig, max_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    f = [train.lr_factor(s, cfg) for s in range(13)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way through the decay
    assert f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    lin = train.make_config(PretrainConfig, max_steps=10, lr_scheduler_type="linear", min_lr_ratio=0.0)
    assert train.lr_factor(5, lin) == pytest.approx(0.5)


def test_no_weight_decay_on_norms_biases_and_the_balancing_bias():
    model = M.build(C.tiny(attention_bias=True, **SMALL))
    cfg = train.make_config(PretrainConfig, weight_decay=0.1)
    opt = train.build_optimizer(train.Objective(model, None), cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed and all(model.get_parameter(names[i]).ndim >= 2 for i in decayed)
    assert id(model.model.layers[0].input_layernorm.weight) not in decayed
    assert id(model.model.layers[0].self_attn.o_proj.bias) not in decayed
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert len(in_opt) == sum(1 for _ in model.parameters())
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert all(p is not bias for g in opt.param_groups for p in g["params"])  # updated by rule, not by AdamW


# --------------------------------------------------------------------------------------------------------------
# The NaN guard


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))


def _toy_loss(model, x):
    loss = (model.w * x).sum()
    return loss, {"loss": loss.detach()}


def test_non_finite_loss_stops_with_a_message_or_skips_the_step(tmp_path):
    for policy in ("stop", "skip"):
        cfg = train.make_config(PretrainConfig, output_dir=str(tmp_path / policy), nan_policy=policy, progress=False)
        run = train.start(cfg, "test")
        module = train.parallelize(train.Objective(_Toy(), _toy_loss), run)
        opt = train.build_optimizer(module, cfg)
        sched = train.build_scheduler(opt, cfg)
        good = train.train_step(module, opt, sched, [(torch.ones(3),)], run, step=0)
        assert good["skipped"] == 0 and good["loss"] == 3.0
        before = module.model.w.detach().clone()
        bad = [(torch.tensor([1.0, float("nan"), 1.0]),)]
        if policy == "stop":
            with pytest.raises(train.TrainingError, match=r"step 2: non-finite.*nan_policy='skip'"):
                train.train_step(module, opt, sched, bad, run, step=1)
        else:
            out = train.train_step(module, opt, sched, bad, run, step=1)
            assert out["skipped"] == 1 and math.isnan(out["loss"])
            assert torch.equal(module.model.w, before)  # no update, and the gradient was cleared
            assert all(p.grad is None for p in module.parameters())
        run.close()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoints_are_safetensors_and_json_only_and_the_last_n_are_kept(tmp_path):
    out = tmp_path / "run"
    pretrain(output_dir=str(out), max_steps=6, save_steps=2, save_total_limit=2, per_device_train_batch_size=2, **PT)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_4", "step_6"]  # step_2 removed; no temporary directory left behind
    suffixes = {p.suffix for p in (out / "checkpoints" / "step_6").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    state = json.loads((out / "checkpoints" / "step_6" / "state.json").read_text())
    assert state["step"] == 6 and state["data_position"] == 12
    from safetensors.torch import load_file

    opt = load_file(str(out / "checkpoints" / "step_6" / "optimizer.safetensors"))
    assert any(k.endswith("::exp_avg_sq") for k in opt) and all(not v.isnan().any() for v in opt.values())
    # the final model and the last checkpoint's model are the same weights, loadable by r1kit
    a, b = M.load(out / "model").state_dict(), M.load(out / "checkpoints" / "step_6" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(train.read_metrics(out)) == 6
    # re-running the finished command does nothing more
    again = pretrain(output_dir=str(out), max_steps=6, save_steps=2, save_total_limit=2, per_device_train_batch_size=2,
                     **PT)
    assert again["step"] == 6 and len(train.read_metrics(out)) == 6


# --------------------------------------------------------------------------------------------------------------
# Two processes = one process with the doubled batch

DIST_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from r1kit.pretrain import pretrain
    from r1kit.sft import sft
    out, pt, sft_kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    pretrain(output_dir=out + "/ddp", parallel="ddp", **pt)
    pretrain(output_dir=out + "/fsdp", parallel="fsdp", **pt)
    sft(output_dir=out + "/sft", parallel="ddp", **sft_kw)
    dist.destroy_process_group()
""")


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    """pretrain under DDP and FSDP2 (with MTP and the balancing bias, checkpointing mid-way) and SFT under DDP
    (where ranks hold different numbers of assistant tokens) match a single process on the whole batch."""
    pt = dict(PT, max_steps=4, save_steps=2, gradient_accumulation_steps=2, resume="false")
    sft_kw = dict(model=str(tmp_path / "single" / "model"), data="addition?digits=2&size=60", max_length=48,
                  packing=False, max_steps=3, progress=False, resume="false")
    single = pretrain(output_dir=str(tmp_path / "single"), per_device_train_batch_size=4, **pt)
    sft(output_dir=str(tmp_path / "single_sft"), per_device_train_batch_size=4, **sft_kw)
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path), json.dumps(dict(pt, per_device_train_batch_size=2)),
         json.dumps(dict(sft_kw, per_device_train_batch_size=2))],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train.read_metrics(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        two = train.read_metrics(tmp_path / name)
        assert len(two) == len(one) == 4
        for a, b in zip(one, two):
            for k in ("loss", "mtp_loss", "grad_norm", "max_violation"):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (name, k, a["step"])
        ref, got = M.load(single["model"]).state_dict(), M.load(tmp_path / name / "model").state_dict()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
        assert (tmp_path / name / "checkpoints" / "step_2" / "rng_1.safetensors").exists()  # each rank's RNG
    one, two = train.read_metrics(tmp_path / "single_sft"), train.read_metrics(tmp_path / "sft")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
