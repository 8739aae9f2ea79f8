"""Kernel tests run the Triton kernels on CPU through the interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, i.e. when ``dspark.kernels.<op>.
triton_kernel`` is first imported, so it must be set before that: ``tests/conftest.py`` sets it
for the whole session and this file repeats the (no-op) ``setdefault`` so the folder also works
on its own. It cannot hurt the other folders: with the variable set, the dispatcher's ``auto``
mode takes the references even for CUDA tensors, and these tests force Triton explicitly with
``dispatch.override("triton")``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_mode_from_env(monkeypatch):
    """A ``DSPARK_KERNELS`` from the caller's shell must not change which path a test compares."""
    monkeypatch.delenv("DSPARK_KERNELS", raising=False)


@pytest.fixture(scope="session")
def interpreted() -> None:
    """Skip when the kernels cannot run here (the interpreter was switched off and there is no GPU)."""
    from dspark.kernels import dispatch

    if not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    if not dispatch.interpreting():
        pytest.skip("TRITON_INTERPRET is off: the kernels cannot run on CPU tensors")
