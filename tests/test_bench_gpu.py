"""bench/gpu.py cannot measure without a GPU, but its code paths run here, on a tiny model (--smoke)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu.py"


def test_gpu_bench_runs_its_steps_on_cpu_and_says_when_it_needs_a_gpu():
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["train_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 2 and "needs a GPU" in r.stderr
