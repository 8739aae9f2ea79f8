"""The kernels compile for a real GPU target (sm_90) without a GPU.

The interpreter never lowers a kernel, so type errors in loop-carried values, unsupported
constructs or register-hungry tiles would only show up on a GPU. ``dspark.kernels.compile_check``
compiles every specialisation the launchers produce with Triton's bundled ptxas, in a process
with the interpreter off (the kernels are decorated at import time).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSPARK_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, and leave no cache behind
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "dspark.kernels.compile_check"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled 12 kernel specialisations for sm_90" in r.stdout, r.stdout
