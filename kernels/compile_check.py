"""Compile every kernel for a CUDA target without a GPU: ``python -m dspark.kernels.compile_check``.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but it runs them as
numpy code: it never type-checks loop-carried values, never lowers to PTX and accepts some things
the compiler rejects. This module drives each op's real launcher with small CPU tensors, and,
instead of launching, compiles the kernel with the launch's argument types and constexprs for
``sm_90`` (Triton's bundled ptxas; no driver needed), in fp32 and bf16 variants. It prints one
line per compiled specialisation and exits non-zero on the first failure.

Run it in a process where ``TRITON_INTERPRET`` is off (it refuses otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["compile_all"]


def _compiler(fn, target, log: Callable[[str], None]):
    """A stand-in for ``fn`` whose ``fn[grid](*args, **kw)`` compiles instead of launching."""
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.jit import mangle_type

    class _Launch:
        def __getitem__(self, grid):
            def run(*args, num_warps: int = 4, **kwargs):
                bound = dict(zip(fn.arg_names, args), **kwargs)
                signature, constexprs = {}, {}
                for p in fn.params:
                    value = bound[p.name]
                    if p.is_constexpr:
                        signature[p.name], constexprs[p.name] = "constexpr", value
                    else:
                        signature[p.name] = mangle_type(value)
                t0 = time.perf_counter()
                triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                               options={"num_warps": num_warps})
                ptrs = sorted({s for s in signature.values() if s.startswith("*")})
                log(f"  {fn.__name__:<28} {', '.join(f'{k}={v}' for k, v in constexprs.items()):<40} "
                    f"{' '.join(ptrs):<28} {time.perf_counter() - t0:5.1f} s")
            return run

    return _Launch()


@contextmanager
def _compiling(module, target, log) -> Iterator[None]:
    """Swap every ``@triton.jit`` kernel of ``module`` for a compiling stand-in."""
    from triton.runtime.jit import JITFunction

    saved = {n: k for n, k in vars(module).items() if isinstance(k, JITFunction) and n.endswith("_kernel")}
    for name, kern in saved.items():
        setattr(module, name, _compiler(kern, target, log))
    try:
        yield
    finally:
        for name, kern in saved.items():
            setattr(module, name, kern)


def _cases() -> list[tuple[str, Callable[[torch.dtype], None]]]:
    from dspark.kernels.loss import triton_kernel as loss_k
    from dspark.kernels.markov import triton_kernel as markov_k
    from dspark.kernels.rejection import triton_kernel as rej_k

    v, r, gamma, rank = 1000, 3, 4, 64
    cu = torch.tensor([0, 2, 2, 5])
    d = 5

    def rejection(dt):
        rej_k.greedy_verify(torch.zeros(d, dtype=torch.int64), torch.zeros(d + r, dtype=torch.int64), cu, 3)
        rej_k.rejection_sample(torch.zeros(d, dtype=torch.int64), torch.rand(d, v, dtype=dt),
                               torch.rand(d + r, v, dtype=dt), cu, 3, torch.rand(d), torch.rand(r, v), 1e-12)

    def markov(dt):
        u, noise = torch.randn(r, gamma, v), torch.rand(r, gamma, v)
        anchors, temp = torch.zeros(r, dtype=torch.int64), torch.ones(r)
        markov_k.markov_sample(u, anchors, torch.randn(v, rank, dtype=dt), torch.randn(v, rank, dtype=dt), temp, noise)
        markov_k.markov_sample(u, anchors, None, None, temp, noise)

    def loss(dt):
        z, t = torch.randn(6, v, dtype=dt), torch.rand(6, v)
        rows, labels = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 3])
        saved = tuple(torch.zeros(3) for _ in range(3))
        loss_k.loss_forward(z, t, rows, labels)
        loss_k.loss_backward(z, t, rows, labels, saved, saved)

    return [("rejection", rej_k, rejection), ("markov", markov_k, markov), ("loss", loss_k, loss)]


def compile_all(arch: int = 90, log: Callable[[str], None] = print) -> int:
    """Compile every kernel specialisation the launchers produce; returns how many compiled."""
    from dspark.kernels.dispatch import interpreting

    if interpreting():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter never compiles)")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    count = 0

    def counted(line: str) -> None:
        nonlocal count
        count += 1
        log(line)

    for name, module, case in _cases():
        log(f"{name}:")
        with _compiling(module, target, counted):
            for dt in (torch.float32, torch.bfloat16):
                case(dt)
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (default 90: H100)")
    args = ap.parse_args(argv)
    n = compile_all(args.arch)
    print(f"compiled {n} kernel specialisations for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
