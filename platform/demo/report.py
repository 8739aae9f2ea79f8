"""What ``dspark demo`` shows and writes: the per-concurrency comparison of the speculative
endpoints with the plain one (a rich table), the scheduler's verify budgets recorded during each
run, the plots (PNG) and the summary files (``summary.md``, ``summary.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DemoRow", "demo_rows", "rich_table", "render_markdown", "plot", "speedup_line"]


@dataclass(frozen=True)
class DemoRow:
    concurrency: int
    variant: str  # the speculative endpoint's label (topology)
    plain: Any  # LoadSummary of the plain endpoint
    spec: Any  # LoadSummary of the speculative endpoint
    mismatches: int | None
    budget: Any  # budgets.BudgetStats, or None when the scheduler was not sampled

    @property
    def speedup(self) -> float | None:
        return self.spec.aggregate_tps / self.plain.aggregate_tps if self.plain.aggregate_tps > 0 else None


def demo_rows(bench_rows: Sequence[Any], budgets: dict[tuple[int, str], Any]) -> list[DemoRow]:
    """Pair each speculative ``ServeBenchRow`` with the plain row of the same concurrency."""
    plain = {r.concurrency: r for r in bench_rows if r.label == "plain"}
    return [DemoRow(r.concurrency, r.label, plain[r.concurrency].load, r.load, r.mismatches,
                    budgets.get((r.concurrency, r.label)))
            for r in bench_rows if r.label != "plain" and r.concurrency in plain]


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _budget(b: Any) -> str:
    if b is None or b.median is None:
        return "–"
    return f"{b.median:.0f}" + ("" if b.low == b.high else f" [{b.low}–{b.high}]")


_HEADS = ["C", "endpoint", "plain tok/s", "speculative tok/s", "speed-up", "τ (tokens/step)", "per-user tok/s plain → spec",
          "TTFT p50 ms plain → spec", "budget (draft tokens/step)", "replica load", "mismatches"]


def _cells(r: DemoRow) -> list[str]:
    return [str(r.concurrency), r.variant, _f(r.plain.aggregate_tps), _f(r.spec.aggregate_tps),
            _f(r.speedup, "{:.2f}×"), _f(r.spec.tokens_per_step, "{:.2f}"),
            f"{_f(r.plain.per_user_tps)} → {_f(r.spec.per_user_tps)}",
            f"{_f(r.plain.ttft_p50 and 1e3 * r.plain.ttft_p50, '{:.0f}')} → {_f(r.spec.ttft_p50 and 1e3 * r.spec.ttft_p50, '{:.0f}')}",
            _budget(r.budget), _f(r.budget.load if r.budget else None, "{:.0%}"),
            "–" if r.mismatches is None else str(r.mismatches)]


def rich_table(rows: Sequence[DemoRow], title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for h in _HEADS:
        t.add_column(h, justify="left" if h == "endpoint" else "right")
    for r in rows:
        cells = _cells(r)
        if r.speedup is not None:
            cells[4] = f"[{'green' if r.speedup >= 1 else 'red'}]{cells[4]}[/]"
        if r.mismatches:
            cells[-1] = f"[red]{cells[-1]}[/]"
        t.add_row(*cells)
    return t


def render_markdown(rows: Sequence[DemoRow]) -> str:
    from dspark.platform.bench.report import markdown_table

    return markdown_table(_HEADS, [_cells(r) for r in rows])


def speedup_line(rows: Sequence[DemoRow]) -> str:
    """One greppable line: ``speculative vs plain: 1.8× at C=1, ...``."""
    return "speculative vs plain: " + ", ".join(
        f"{_f(r.speedup, '{:.2f}×')} at C={r.concurrency}" + (f" ({r.variant})" if len({x.variant for x in rows}) > 1 else "")
        for r in rows)


def plot(rows: Sequence[DemoRow], path: Path, title: str) -> None:
    """Aggregate tokens/s (plain and speculative), speed-up, τ and the scheduler's budget against
    concurrency, in the style of the benchmark plots (log2 x axis, plain dashed black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = sorted({r.concurrency for r in rows})
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ax = axes[0]
    plain = {r.concurrency: r.plain.aggregate_tps for r in rows}
    ax.plot(conc, [plain[c] for c in conc], "k--", marker="o", ms=4, label="plain")
    for i, v in enumerate(variants):
        pts = [(r.concurrency, r.spec.aggregate_tps) for r in rows if r.variant == v]
        ax.plot(*zip(*pts), color=f"C{i}", marker="s", ms=4, label=v)
    ax.set_title("aggregate tokens/s", fontsize=10)
    ax.legend(fontsize=8)
    panels = [("speed-up over plain (×)", lambda r: r.speedup), ("τ: tokens per verify step", lambda r: r.spec.tokens_per_step)]
    for ax, (name, get) in zip(axes[1:3], panels):
        for i, v in enumerate(variants):
            pts = [(r.concurrency, get(r)) for r in rows if r.variant == v and get(r) is not None]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", marker="s", ms=4, label=v)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_title(name, fontsize=10)
    ax = axes[3]
    for i, v in enumerate(variants):
        pts = [(r.concurrency, r.budget) for r in rows if r.variant == v and r.budget and r.budget.median is not None]
        if pts:
            xs = [c for c, _ in pts]
            ys = [b.median for _, b in pts]
            err = [[y - b.low for (_, b), y in zip(pts, ys)], [b.high - y for (_, b), y in zip(pts, ys)]]
            ax.errorbar(xs, ys, yerr=err, color=f"C{i}", marker="s", ms=4, capsize=3, label=v)
    ax.set_title("scheduler budget (draft tokens / step)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent streams (C)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(obj: Any) -> Any:
    """Dataclasses (rows, summaries) as JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(to_json(obj), indent=2))
