"""CPU kernels in C++ (r1kit/csrc), built on first use with the system compiler and loaded as torch ops.

The build is cached per source, torch version and CPU (its instruction sets) under `$R1KIT_CACHE` (default
~/.cache/r1kit/kernels) and written atomically, so concurrent processes never load half a library. Without a
compiler, or with `R1KIT_KERNELS=0`, `load` returns False and callers keep their pure-PyTorch path; the tests compare
the two.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SRC = Path(__file__).parent / "csrc"


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (/proc/cpuinfo's first `flags` line), or "" where there is none."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line for line in cpu.splitlines() if line.startswith("flags")), "")


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cpu = _cpu_flags() + " "
    if " avx2 " in cpu and " fma " in cpu:  # ATen's Vectorized<float> takes its width from this macro
        flags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    from torch.utils.cpp_extension import include_paths, library_paths

    flags += [f"-I{p}" for p in include_paths()]
    flags += [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    flags += [f"-Wl,-rpath,{p}" for p in library_paths()]
    return flags


LOADED: dict[str, bool] = {}  # name -> whether its ops are registered, for every `load` so far


def load(name: str) -> bool:
    """Build (once) and load csrc/<name>.cpp; True when its ops are registered. Not traceable: under torch.compile
    read `LOADED` (the engine loads its kernels before it compiles)."""
    if name not in LOADED:
        LOADED[name] = _load(name)
    return LOADED[name]


def _load(name: str) -> bool:
    if os.environ.get("R1KIT_KERNELS", "1") == "0" or sys.platform != "linux":
        return False
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return False
    src = SRC / f"{name}.cpp"
    flags = _flags()
    headers = [h.read_text() for h in sorted(SRC.glob("*.h"))]  # a changed shared header is a new build too
    # -march=native: a build is only good on CPUs with the same instruction sets (an AVX-512 build on an AVX2-only
    # machine sharing the cache dies of an illegal instruction), so the CPU's feature flags are part of the key
    key = hashlib.sha256("\0".join([src.read_text(), *headers, torch.__version__, platform.machine(), _cpu_flags(),
                                     compiler, *flags]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("R1KIT_CACHE", Path.home() / ".cache" / "r1kit")) / "kernels"
    lib = root / f"{name}-{key}.so"
    if not lib.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            part = Path(tmp) / lib.name
            run = subprocess.run([compiler, str(src), "-o", str(part), *flags], capture_output=True, text=True)
            if run.returncode != 0:
                warnings.warn(f"r1kit: building {src} failed, using the PyTorch path:\n{run.stderr[-2000:]}")
                return False
            os.replace(part, lib)
    try:
        torch.ops.load_library(str(lib))
    except OSError as e:  # a cached build this torch cannot load
        warnings.warn(f"r1kit: loading {lib} failed, using the PyTorch path: {e}")
        return False
    return True
