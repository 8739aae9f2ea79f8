"""Choosing between a Triton fast path and its plain-torch reference.

Every op in ``dspark.kernels`` has a reference (``<op>/reference.py``, the specification) and a
Triton implementation (``<op>/triton_kernel.py``). The op's entry point asks :func:`use_triton`
once per call and runs one or the other; nothing else in the project imports a kernel module.

Rule (the mode comes from :func:`override` if one is active, else ``$DSPARK_KERNELS``):

* ``auto`` (default): Triton iff every tensor given is on CUDA, triton imports, and the Triton
  interpreter is off. CPU tensors always take the reference, so CPU behaviour never depends on
  whether triton is installed. ``TRITON_INTERPRET=1`` (which the test suite sets) also means the
  reference in ``auto``: a GPU test run with that variable set would otherwise run every CUDA
  call through the slow interpreter.
* ``triton``: always Triton. CUDA tensors run compiled kernels; CPU tensors need
  ``TRITON_INTERPRET=1`` set before the kernel modules are imported (that is how the CPU tests
  exercise the kernels). Without triton this raises :class:`TritonUnavailableError`, an
  ``ImportError`` that says ``pip install triton``.
* ``reference``: always the reference.

Importing this module (or any ``dspark.kernels`` package) never imports triton: the kernel
modules are loaded on first use by :func:`load`, so a missing or broken triton can only fail a
call that asked for Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Iterator

import torch

__all__ = [
    "ENV_VAR",
    "HAS_TRITON",
    "INSTALL_HINT",
    "MODES",
    "TritonUnavailableError",
    "interpreting",
    "load",
    "mode",
    "override",
    "use_triton",
]

ENV_VAR = "DSPARK_KERNELS"
MODES = ("auto", "triton", "reference")
INSTALL_HINT = "pip install triton"

#: triton is installed (found on the path; not imported here: that takes ~2 s)
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None

# NOTE: a ContextVar, not a module global, so an override in one thread (or asyncio task) does
# not change what a concurrent caller gets.
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dspark_kernels_override", default=None)

_triton_error: BaseException | None = None  # why `import triton` failed, once tried
_triton_checked = False
_warned_auto = False


class TritonUnavailableError(ImportError):
    """The Triton path was requested but triton is missing or does not import."""


def _check_mode(value: str, where: str) -> str:
    if value not in MODES:
        raise ValueError(f"{where} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def mode() -> str:
    """The active mode: the innermost :func:`override`, else ``$DSPARK_KERNELS``, else ``auto``."""
    forced = _OVERRIDE.get()
    if forced is not None:
        return forced
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def override(value: str) -> Iterator[None]:
    """Force a mode inside a ``with`` block (tests: run both implementations on the same inputs)."""
    token = _OVERRIDE.set(_check_mode(value, "dispatch mode"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is on (the values triton itself accepts as true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _import_triton() -> BaseException | None:
    """Import triton once; the exception it raised, or None when it works."""
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        if not HAS_TRITON:
            _triton_error = ModuleNotFoundError("No module named 'triton'")
        else:
            try:
                importlib.import_module("triton")
            except Exception as e:  # a broken install (e.g. a mismatched driver library) must not crash callers
                _triton_error = e
    return _triton_error


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the op called with ``tensors`` should take its Triton path (see the module rule)."""
    m = mode()
    if m == "reference":
        return False
    if m == "triton":
        return True  # load() raises the helpful error if it cannot
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors) or interpreting():
        return False
    err = _import_triton()
    if err is not None:
        global _warned_auto
        if not _warned_auto:
            _warned_auto = True
            warnings.warn(f"dspark.kernels: triton unusable ({err!r}); using the torch references. "
                          f"To get the fused kernels: {INSTALL_HINT}", RuntimeWarning, stacklevel=2)
        return False
    return True


def load(op: str, *tensors: torch.Tensor) -> ModuleType:
    """``dspark.kernels.<op>.triton_kernel``, checked usable for ``tensors``.

    Raises :class:`TritonUnavailableError` (naming ``pip install triton``) when triton cannot be
    imported, and ``RuntimeError`` for CPU tensors without the interpreter.
    """
    err = _import_triton()
    if err is not None:
        raise TritonUnavailableError(
            f"the Triton path of dspark.kernels.{op} needs triton, which failed to import ({err!r}); "
            f"install it with `{INSTALL_HINT}` or set {ENV_VAR}=reference"
        ) from err
    cpu = [t for t in tensors if isinstance(t, torch.Tensor) and not t.is_cuda]
    if cpu and not interpreting():
        raise RuntimeError(
            f"the Triton path of dspark.kernels.{op} got CPU tensors: compiled Triton kernels need CUDA. "
            "Set TRITON_INTERPRET=1 before the kernels are first imported to run them on CPU "
            f"(slow; for tests), or set {ENV_VAR}=reference"
        )
    module = importlib.import_module(f"dspark.kernels.{op}.triton_kernel")
    if cpu and not getattr(module, "INTERPRETED", True):
        raise RuntimeError(
            f"dspark.kernels.{op} was imported before TRITON_INTERPRET=1 was set, so its kernels are "
            "compiled (CUDA only); set the variable before the first import to run them on CPU"
        )
    return module
