"""Kernel benchmark: ``python -m dspark.kernels.bench``.

On a CUDA machine (with triton), for every op at serving / training sizes: the reference's and the
kernel's time (``triton.testing.do_bench``, median), the speedup, the peak memory each allocates
beyond its inputs, and a check that both give the same result. Goals: ≥3× for rejection sampling
and Markov block sampling, ≤½ the reference's peak memory for the fused loss at vocab 151936.

Without a GPU it runs the same checks at small shapes through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before any kernel is imported), compiles every kernel for sm_90
(:mod:`dspark.kernels.compile_check`, in a subprocess with the interpreter off) and says that no
GPU figures were taken; the GPU columns stay empty.

Either way it prints a table and writes it to ``BENCHMARKS.md`` as the section ``kernels`` (with
the command, machine and date); ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SECTION = "kernels"
TITLE = "Triton kernels vs torch references (dspark.kernels)"
VOCAB = 151936  # Qwen-family vocabulary


@dataclass
class Case:
    op: str  # dspark.kernels.<op> entry
    label: str  # shape / setting, as printed
    make: Callable[[torch.device], tuple]  # inputs on a device
    reference: Callable[..., Any]
    triton: Callable[..., Any]
    compare: Callable[[Any, Any], str]  # "equal" / "close (max abs err …)"; raises when they differ
    goal: str  # "speed" (≥3×) or "memory" (≤½)


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------


def _equal(a, b) -> str:
    for x, y in zip(a, b):
        if not torch.equal(x, y):
            raise AssertionError(f"outputs differ: {x} vs {y}")
    return "equal"


def _markov_match(a, b) -> str:
    """Logits must be close; tokens equal, except that with bf16 weights the reference's bias is
    rounded after cuBLAS's sum and the kernel's after its own, one bf16 ulp apart at times, which
    can move a near-tie (so the share of equal tokens is reported instead of failing)."""
    err = float((a[1] - b[1]).abs().max()) if a[1].numel() else 0.0
    torch.testing.assert_close(a[1], b[1], rtol=1e-2, atol=5e-2)
    same = float((a[0] == b[0]).float().mean()) if a[0].numel() else 1.0
    return ("tokens equal" if same == 1.0 else f"tokens {same:.1%} equal") + f", logits max abs err {err:.1e}"


def _close(a, b) -> str:
    err = 0.0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-4)
        err = max(err, float((x - y).abs().max()) if x.numel() else 0.0)
    return f"close (max abs err {err:.1e})"


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


def _rejection_inputs(r: int, max_len: int, vocab: int, seed: int = 0):
    def make(dev):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, max_len + 1, (r,), generator=g)
        lengths[0] = max_len
        d = int(lengths.sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        p_t = torch.softmax(torch.randn(d + r, vocab, device=dev) * 3, -1)
        rows = (torch.arange(d) + torch.repeat_interleave(torch.arange(r), lengths)).to(dev)
        p_d = torch.softmax(0.8 * torch.log(p_t[rows] + 1e-9) + torch.randn(d, vocab, device=dev), -1)
        drafts = torch.multinomial(p_d, 1).squeeze(1)
        return drafts, p_d, p_t, cu, torch.rand(d, device=dev), torch.empty(r, vocab, device=dev).exponential_()
    return make


def _greedy_inputs(r: int, max_len: int, vocab: int):
    base = _rejection_inputs(r, max_len, vocab)

    def make(dev):
        drafts, p_d, p_t, cu, _, _ = base(dev)
        return p_d.argmax(-1), p_t.argmax(-1), cu
    return make


def _markov_inputs(r: int, gamma: int, vocab: int, rank: int, temperature: float, wdtype=torch.bfloat16):
    def make(dev):
        g = torch.Generator(device=dev).manual_seed(0)
        base = torch.randn(r, gamma, vocab, device=dev, generator=g) * 2
        anchors = torch.randint(0, vocab, (r,), device=dev, generator=g)
        w1 = (torch.randn(vocab, rank, device=dev, generator=g)).to(wdtype) if rank else None
        w2 = (torch.randn(vocab, rank, device=dev, generator=g) * 0.3).to(wdtype) if rank else None
        temp = torch.full((r,), temperature, device=dev)
        noise = torch.empty(r, gamma, vocab, device=dev).exponential_(generator=g)
        return base, anchors, w1, w2, temp, noise
    return make


def _loss_inputs(rows: int, vocab: int, gamma: int = 7):
    def make(dev):
        g = torch.Generator(device=dev).manual_seed(0)
        blocks = max(1, rows // gamma)
        logits = torch.randn(1, blocks, gamma, vocab, device=dev, generator=g) * 3
        p_t = torch.softmax(torch.randn(1, blocks, gamma, vocab, device=dev, generator=g) * 2, -1)
        labels = torch.randint(0, vocab, (1, blocks, gamma), device=dev, generator=g)
        mask = torch.ones(1, blocks, gamma, dtype=torch.bool, device=dev)
        mask[0, ::3, gamma // 2:] = False  # some blocks leave the loss mask early
        return logits.requires_grad_(), p_t, labels, mask
    return make


def _loss_step(fn):
    """Forward + backward of Σ (0.1·ce + 0.9·l1 + 0.2·soft), returning (terms, ∂/∂logits)."""
    def run(logits, p_t, labels, mask):
        ce, l1, soft = fn(logits, p_t, labels, mask)
        total = (0.1 * ce + 0.9 * l1 + 0.2 * soft).sum()
        (grad,) = torch.autograd.grad(total, logits)
        return ce.detach(), l1.detach(), soft.detach(), grad
    return run


def cases(gpu: bool) -> list[Case]:
    from dspark.kernels.loss import loss_terms_triton
    from dspark.kernels.loss import reference as loss_ref
    from dspark.kernels.markov import markov_sample_triton
    from dspark.kernels.markov import reference as markov_ref
    from dspark.kernels.rejection import greedy_verify_triton, rejection_sample_triton
    from dspark.kernels.rejection import reference as rej_ref

    if gpu:  # serving batches and a DeepSpec-sized training micro-batch (512 anchors × γ 7)
        rejection = [(8, VOCAB), (64, VOCAB)]
        markov = [(1, VOCAB, 64, 1.0), (8, VOCAB, 64, 1.0), (8, VOCAB, 64, 0.0), (64, VOCAB, 64, 1.0),
                  (8, VOCAB, 0, 1.0), (8, 32000, 64, 1.0)]
        loss = [(896, VOCAB), (3584, VOCAB)]
        wdtype = torch.bfloat16
    else:  # interpreter: small shapes (and the real vocabulary where it stays fast)
        rejection = [(3, 300), (2, VOCAB)]
        markov = [(2, 300, 8, 1.0), (2, 300, 8, 0.0), (2, 300, 0, 1.0)]
        loss = [(14, 300), (7, VOCAB)]
        wdtype = torch.float32  # fp32 weights: the token check is then exact (see _markov_match)
    out = []
    for r, v in rejection:
        out.append(Case("rejection.rejection_sample", f"R={r}, ℓ≤7, V={v}, fp32",
                        _rejection_inputs(r, 7, v), rej_ref.rejection_sample, rejection_sample_triton, _equal, "speed"))
    r, v = rejection[-1]
    out.append(Case("rejection.greedy_verify", f"R={r}, ℓ≤7", _greedy_inputs(r, 7, v),
                    rej_ref.greedy_verify, greedy_verify_triton, _equal, "speed"))
    for r, v, rank, temp in markov:
        head = f"vanilla r={rank} {str(wdtype).split('.')[-1]}" if rank else "no head (DFlash)"
        out.append(Case("markov.markov_sample", f"R={r}, γ=7, V={v}, {head}, T={temp:g}",
                        _markov_inputs(r, 7, v, rank, temp, wdtype), markov_ref.markov_sample, markov_sample_triton,
                        _markov_match, "speed"))
    for n, v in loss:
        out.append(Case("loss.loss_terms (fwd+bwd)", f"{n // 7 * 7} slots, V={v}", _loss_inputs(n, v),
                        _loss_step(loss_ref.loss_terms), _loss_step(loss_terms_triton), _close, "memory"))
    return out


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated by ``fn`` beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def measure(case: Case, timed: bool, dev: torch.device) -> dict[str, str]:
    """One table row: the check, and (``timed``: on a GPU) times, peak memory and the goal."""
    torch.manual_seed(0)
    inputs = case.make(dev)
    t0 = time.perf_counter()
    try:
        check = case.compare(case.triton(*inputs), case.reference(*inputs))
    except Exception as e:  # report and go on: one broken case must not hide the others
        return {"op": case.op, "shape": case.label, "check": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"}
    row = {"op": case.op, "shape": case.label, "check": check}
    if not timed:
        row["check"] += f" ({time.perf_counter() - t0:.1f} s interpreted)"
        return row
    from triton.testing import do_bench

    t_ref = do_bench(lambda: case.reference(*inputs), warmup=10, rep=50, return_mode="median")
    t_tri = do_bench(lambda: case.triton(*inputs), warmup=10, rep=50, return_mode="median")
    m_ref, m_tri = _peak_mib(lambda: case.reference(*inputs)), _peak_mib(lambda: case.triton(*inputs))
    speed, mem = t_ref / t_tri, (m_tri / m_ref if m_ref > 0 else float("nan"))
    met = speed >= 3.0 if case.goal == "speed" else mem <= 0.5
    row.update({
        "ref ms": f"{t_ref:.3f}", "triton ms": f"{t_tri:.3f}", "speedup": f"{speed:.2f}×",
        "ref MiB": f"{m_ref:.0f}", "triton MiB": f"{m_tri:.0f}", "mem ratio": f"{mem:.2f}",
        "goal": ("≥3× speed" if case.goal == "speed" else "≤½ memory") + (" ✓" if met else " ✗"),
    })
    return row


COLUMNS = ["op", "shape", "check", "ref ms", "triton ms", "speedup", "ref MiB", "triton MiB", "mem ratio", "goal"]


def _compile_check() -> str:
    """Compile every kernel for sm_90 in a subprocess with the interpreter off."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as cache:  # compile for real, and leave no cache behind
        env["TRITON_CACHE_DIR"] = cache
        r = subprocess.run([sys.executable, "-m", "dspark.kernels.compile_check"], env=env, capture_output=True,
                           text=True, timeout=900)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return last if r.returncode == 0 else f"FAILED: {(r.stderr.strip().splitlines() or [last])[-1]}"


def run(gpu: bool | None = None, compile_check: bool = True, progress: bool = True) -> tuple[list[dict], list[str]]:
    """(rows, notes) for this machine."""
    from dspark.kernels import dispatch

    if gpu is None:
        gpu = torch.cuda.is_available() and dispatch.HAS_TRITON and not dispatch.interpreting()
    notes = []
    if not gpu:
        if not dispatch.HAS_TRITON:
            return [], [f"triton is not installed ({dispatch.INSTALL_HINT}): nothing was run."]
        if not dispatch.interpreting():
            return [], ["No GPU and TRITON_INTERPRET is off (the kernels were imported without it): nothing was run."]
        notes.append("**No GPU on this machine: no GPU figures were taken** (time, speedup and memory columns are "
                     "empty). Each row is a correctness check of the kernel against its reference, run through "
                     "Triton's interpreter on CPU at a small shape.")
    from tqdm import tqdm

    rows = []
    dev = torch.device("cuda" if gpu else "cpu")
    with dispatch.override("triton"):
        for case in tqdm(cases(gpu), desc="kernels", unit="case", disable=not progress):
            rows.append(measure(case, gpu, dev))
    if not gpu and compile_check:
        notes.append(f"Compile check for a real GPU target (`python -m dspark.kernels.compile_check`): {_compile_check()}.")
    if gpu:
        notes.append("Times: `triton.testing.do_bench` medians. Memory: peak CUDA allocation of one call beyond its "
                     "inputs (the loss: forward + backward, gradient included).")
    return rows, notes


def render(rows: list[dict], notes: list[str]) -> str:
    from dspark.platform.bench.report import markdown_table

    table = markdown_table(COLUMNS, [[row.get(c, "") for c in COLUMNS] for row in rows]) if rows else ""
    return "\n\n".join([*notes, table]).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark.kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="BENCHMARKS.md", help="benchmarks file to update (section 'kernels')")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--no-compile-check", action="store_true", help="CPU: skip compiling the kernels for sm_90")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        # the kernels are decorated at import: the interpreter must be on before the first one is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows, notes = run(compile_check=not args.no_compile_check)
    body = render(rows, notes)
    print(body)
    if not args.no_write:
        from dspark.platform.bench.report import write_section

        command = " ".join(["python -m dspark.kernels.bench", *(argv if argv is not None else sys.argv[1:])])
        path = write_section(Path(args.output), SECTION, TITLE, body, command=command)
        print(f"wrote section '{SECTION}' of {path}")
    failed = [r for r in rows if r["check"].startswith("FAILED")] + [n for n in notes if "FAILED" in n]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
