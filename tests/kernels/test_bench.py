"""``python -m dspark.kernels.bench``: the CPU run (interpreter checks, no GPU figures) and its
BENCHMARKS.md section; the GPU row format with the timer and memory probe stubbed."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels import bench, dispatch

pytestmark = pytest.mark.usefixtures("interpreted")


def test_cpu_run_writes_its_own_section(tmp_path, monkeypatch, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    small = [c for c in bench.cases(gpu=False) if "151936" not in c.label][:3]  # the fast ones
    monkeypatch.setattr(bench, "cases", lambda gpu: small)
    assert bench.main(["--output", str(out), "--no-compile-check"]) == 0
    text = out.read_text()
    assert "<!-- bench:other -->\nkept" in text  # other sections untouched
    section = text[text.index("<!-- bench:kernels -->"):text.index("<!-- /bench:kernels -->")]
    assert "python -m dspark.kernels.bench" in section and "machine:" in section and "date:" in section
    assert "No GPU on this machine: no GPU figures were taken" in section
    assert section.count("| equal") + section.count("| tokens equal") == 3
    assert "FAILED" not in section
    assert "No GPU" in capsys.readouterr().out


def test_timed_row_format(monkeypatch):
    import triton.testing

    times = iter([3.0, 1.0])  # reference, then kernel
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), next(times))[1])
    mems = iter([100.0, 20.0])
    monkeypatch.setattr(bench, "_peak_mib", lambda fn: (fn(), next(mems))[1])
    case = bench.cases(gpu=False)[0]
    with dispatch.override("triton"):
        row = bench.measure(case, True, torch.device("cpu"))
    assert row["check"] == "equal"
    assert (row["ref ms"], row["triton ms"], row["speedup"]) == ("3.000", "1.000", "3.00×")
    assert (row["ref MiB"], row["triton MiB"], row["mem ratio"]) == ("100", "20", "0.20")
    assert row["goal"] == "≥3× speed ✓"


def test_a_failing_check_is_reported_not_raised():
    case = bench.cases(gpu=False)[0]
    broken = bench.Case(case.op, case.label, case.make, case.reference,
                        lambda *a: (torch.zeros(3, dtype=torch.int64), torch.zeros(3, 8, dtype=torch.int64)),
                        case.compare, case.goal)
    row = bench.measure(broken, False, torch.device("cpu"))
    assert row["check"].startswith("FAILED: AssertionError")
