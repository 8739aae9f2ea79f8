"""The dispatcher: mode resolution, the CUDA rule, the override, and the errors when Triton cannot
run (missing triton, CPU tensors without the interpreter); importing the kernels never needs triton."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch

from dspark.kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]


def fake_cuda_tensor() -> torch.Tensor:
    t = mock.MagicMock(spec=torch.Tensor)
    t.is_cuda = True
    return t


def test_mode_from_env_and_override(monkeypatch):
    assert dispatch.mode() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "Reference")
    assert dispatch.mode() == "reference"
    with dispatch.override("triton"):
        assert dispatch.mode() == "triton"
        with dispatch.override("auto"):
            assert dispatch.mode() == "auto"
        assert dispatch.mode() == "triton"
    assert dispatch.mode() == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DSPARK_KERNELS must be one of auto, triton, reference"):
        dispatch.mode()
    with pytest.raises(ValueError, match="one of"):
        with dispatch.override("cuda"):
            pass


def test_override_is_local_to_its_thread():
    seen = []
    with dispatch.override("triton"):
        t = threading.Thread(target=lambda: seen.append(dispatch.mode()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_auto_rule(monkeypatch):
    cpu, gpu = torch.zeros(2), fake_cuda_tensor()
    assert not dispatch.use_triton(cpu)
    assert not dispatch.use_triton(gpu, cpu)  # every tensor must be on CUDA
    # under the interpreter (as in the test suite) auto keeps even CUDA tensors on the reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dispatch.use_triton(gpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dispatch.use_triton(gpu) == dispatch.HAS_TRITON
    with dispatch.override("reference"):
        assert not dispatch.use_triton(gpu)
    with dispatch.override("triton"):
        assert dispatch.use_triton(cpu)


def test_missing_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_checked", True)
    monkeypatch.setattr(dispatch, "_triton_error", ModuleNotFoundError("No module named 'triton'"))
    monkeypatch.setattr(dispatch, "_warned_auto", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(RuntimeWarning, match="pip install triton"):
        assert not dispatch.use_triton(fake_cuda_tensor())  # auto: falls back, says what to install
    with pytest.raises(dispatch.TritonUnavailableError, match="pip install triton") as err:
        dispatch.load("rejection", torch.zeros(1))
    assert isinstance(err.value, ImportError)


def test_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.load("rejection", torch.zeros(1))


def test_kernels_import_and_run_without_triton():
    """With triton unimportable: every package imports, auto runs the references, and forcing
    Triton raises an ImportError that names the install command."""
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
from dspark.kernels import dispatch
import dspark.kernels.rejection as rej, dspark.kernels.markov as mk, dspark.kernels.loss as ls
from dspark.platform import sampling
cu = torch.tensor([0, 1]); p = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
n, out = rej.rejection_sample(torch.tensor([1]), p[:1], p, cu, torch.tensor([0.1]), torch.ones(1, 2))
assert out.tolist() == [[1, 0]], out
try:
    with dispatch.override("triton"):
        sampling.rejection_sample(torch.tensor([1]), p[:1], p, cu, torch.tensor([0.1]), torch.ones(1, 2))
except ImportError as e:
    assert "pip install triton" in str(e), e
    print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("DSPARK_KERNELS",)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr


def test_kernel_modules_are_loaded_only_through_the_dispatcher():
    """No source file imports a ``triton_kernel`` module (or ``_triton_common``) by name except the
    kernel modules themselves and the compile check: callers go through an op's entry points."""
    import ast

    allowed = {ROOT / "kernels" / "compile_check.py"} | set((ROOT / "kernels").glob("*/triton_kernel.py"))
    bad = []
    for folder in ("platform", "drafter_service", "verifier_service", "scheduler", "kernels", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed or "__pycache__" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                bad += [(path.relative_to(ROOT), n) for n in names if n.endswith(("triton_kernel", "_triton_common"))]
    assert not bad, bad
