"""Sequential Temperature Scaling (STS) of the confidence head, and the calibration metrics.

Notation (DSpark paper §3.1 and §3.2.1). Each row n is one request in one verify step. The
drafter's confidence head gave logits z_{n,k} for block positions k = 1..γ, and
c_{n,k} = σ(z_{n,k} / T_k) is its estimate of P(d_k accepted | d_<k accepted). The target
verified ℓ_n drafts and accepted a_n ≤ ℓ_n of them.

* Prefix survival, the prediction for position k: s_{n,k} = Π_{j≤k} c_{n,j}.
* Its outcome: y_{n,k} = 1[a_n ≥ k]. It is observed only on rows with ℓ_n ≥ k.

STS fits T_1..T_γ from left to right. T_k minimises the ECE of s_{·,k} against y_{·,k} over the
observed rows, with T_<k already fixed. The search is one-dimensional over log T in
[t_min, t_max]: a log-spaced grid, then finer grids around the best point. Ties go to the
temperature closest to 1. Each T_k > 0 is monotone in z_k, so the ranking of c_k at one
position is unchanged.

ECE uses B equal-width bins over [0, 1]; B = 20 by default, as in DeepSpec's evaluator. Bin b
holds the predictions p with ⌊p·B⌋ = b, and p = 1 goes in the last bin. Then

    ECE = Σ_b (n_b / N) · |mean(y in b) − mean(p in b)|.

AUROC is rank-based (Mann–Whitney): tied predictions get their average rank, so a tied
(positive, negative) pair counts ½. Brier is mean((p − y)²).

Everything above the "Runner" line is pure numpy. The runner collects steps through the real
engine; see :mod:`dspark.platform.training.evaluate`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from dspark.platform.training.evaluate import StepTable

__all__ = [
    "CalibrationError",
    "logit",
    "survival",
    "prefix_outcomes",
    "ece",
    "reliability_bins",
    "auroc",
    "brier",
    "fit_temperature",
    "fit_sts",
    "PositionCalibration",
    "CalibrationReport",
    "calibration_report",
    "plot_reliability",
    "calibrate_drafter",
    "json_safe",
]


class CalibrationError(ValueError):
    """Calibration cannot run on this input (message is meant for users)."""


# ------------------------------------------------------------------------------ pure math
def logit(c: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """log(c / (1 − c)) in float64, with c clipped to [eps, 1 − eps]. A float32 sigmoid saturates
    to exactly 1 for z ≳ 17, so logits this far out come back as about ±16."""
    c = np.clip(np.asarray(c, dtype=np.float64), eps, 1.0 - eps)
    return np.log(c) - np.log1p(-c)


def survival(
    z: np.ndarray,  # [N, γ] confidence logits
    temperatures: np.ndarray,  # [γ] T_k > 0
) -> np.ndarray:  # [N, γ] s_{n,k} = Π_{j≤k} σ(z_{n,j} / T_j)
    """Prefix survival. The product is taken in log space (log σ(x) = −log(1 + e^{−x})), so long
    blocks do not underflow."""
    z = np.asarray(z, dtype=np.float64)
    t = np.asarray(temperatures, dtype=np.float64)
    assert z.ndim == 2 and t.shape == (z.shape[1],), (z.shape, t.shape)
    return np.exp(np.cumsum(-np.logaddexp(0.0, -z / t[None, :]), axis=1))


def prefix_outcomes(
    lengths: np.ndarray,  # [N] int ℓ_n
    accepted: np.ndarray,  # [N] int a_n ≤ ℓ_n
    gamma: int,
) -> tuple[np.ndarray, np.ndarray]:  # y [N, γ] bool = 1[a ≥ k]; observed [N, γ] bool = ℓ ≥ k
    """Column k−1 holds position k. Example: ℓ = [3, 1] and a = [2, 0] with γ = 3 give
    y = [[1 1 0], [0 0 0]] and observed = [[1 1 1], [1 0 0]]."""
    lengths, accepted = np.asarray(lengths), np.asarray(accepted)
    assert lengths.shape == accepted.shape and lengths.ndim == 1, (lengths.shape, accepted.shape)
    k = np.arange(1, gamma + 1)[None, :]  # [1, γ]
    return accepted[:, None] >= k, lengths[:, None] >= k


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:  # [M] -> [M] in 0..bins-1
    return np.minimum((np.asarray(p, dtype=np.float64) * bins).astype(np.int64), bins - 1)


def reliability_bins(
    p: np.ndarray,  # [M] predictions in [0, 1]
    y: np.ndarray,  # [M] 0/1 outcomes
    bins: int = 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # mean p [B], fraction positive [B], count [B]
    """Per-bin statistics of a reliability diagram. Empty bins hold NaN and count 0."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    assert p.shape == y.shape and p.ndim == 1, (p.shape, y.shape)
    b = _bin_index(p, bins)
    n = np.bincount(b, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=bins) / n
        frac = np.bincount(b, weights=y, minlength=bins) / n
    return mean_p, frac, n.astype(np.int64)


def ece(
    p: np.ndarray,  # [M] predictions in [0, 1]
    y: np.ndarray,  # [M] 0/1 outcomes
    bins: int = 20,
) -> float:
    """Expected calibration error over ``bins`` equal-width bins; NaN when M = 0.

    Example with bins = 10: p = [0.1, 0.2, 0.9, 0.95] and y = [0, 1, 1, 1] give
    ¼·0.1 + ¼·0.8 + ½·|1 − 0.925| = 0.2625."""
    mean_p, frac, n = reliability_bins(p, y, bins)
    total = n.sum()
    if total == 0:
        return float("nan")
    keep = n > 0
    return float(np.sum(n[keep] / total * np.abs(frac[keep] - mean_p[keep])))


def auroc(
    p: np.ndarray,  # [M] scores
    y: np.ndarray,  # [M] 0/1 outcomes
) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative),
    with ties counted ½. Computed from average ranks; NaN if either class is empty."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y).astype(bool)
    assert p.shape == y.shape and p.ndim == 1, (p.shape, y.shape)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct value: first rank of its run + (count − 1)/2
    first = np.cumsum(counts) - counts + 1
    ranks = (first + (counts - 1) / 2.0)[inverse]  # [M]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of probabilities against 0/1 outcomes; NaN when empty."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def fit_temperature(
    z: np.ndarray,  # [M] logits of the position being fitted
    prior: np.ndarray,  # [M] survival up to the previous position (ones at position 1)
    y: np.ndarray,  # [M] 0/1 outcomes 1[a ≥ k]
    *,
    bins: int = 20,
    t_range: tuple[float, float] = (0.05, 20.0),
    grid: int = 241,
    refine: int = 2,
) -> float:
    """The T that minimises ECE(prior · σ(z / T), y). The search starts on a ``grid``-point log grid
    over ``t_range`` and then refines ``refine`` times, each time on a 41-point grid between the
    best point's neighbours. Ties go to the T with the smallest |log T|. With a range symmetric in
    log T and an odd ``grid``, T = 1 is on the first grid, so in-sample ECE at this position never
    gets worse."""
    lo, hi = math.log(t_range[0]), math.log(t_range[1])
    assert lo < hi and grid >= 3, (t_range, grid)
    z, prior = np.asarray(z, dtype=np.float64), np.asarray(prior, dtype=np.float64)

    def best_of(log_ts: np.ndarray) -> tuple[int, float]:
        errs = np.array([ece(prior * np.exp(-np.logaddexp(0.0, -z / math.exp(lt))), y, bins) for lt in log_ts])
        order = np.lexsort((np.abs(log_ts), np.round(errs, 12)))  # ECE first, then closeness to T = 1
        return int(order[0]), float(errs[order[0]])

    log_ts = np.linspace(lo, hi, grid)
    i, _ = best_of(log_ts)
    for _ in range(refine):
        a, b = log_ts[max(i - 1, 0)], log_ts[min(i + 1, len(log_ts) - 1)]
        log_ts = np.union1d(np.linspace(a, b, 41), [log_ts[i]])
        i, _ = best_of(log_ts)
    return float(math.exp(log_ts[i]))


def fit_sts(
    z: np.ndarray,  # [N, γ] confidence logits (uncalibrated, i.e. at T = 1)
    y: np.ndarray,  # [N, γ] bool prefix outcomes 1[a ≥ k]
    observed: np.ndarray,  # [N, γ] bool ℓ ≥ k
    *,
    bins: int = 20,
    t_range: tuple[float, float] = (0.05, 20.0),
    min_rows: int = 20,
) -> np.ndarray:  # [γ] fitted temperatures T_k
    """Sequential Temperature Scaling: T_k = argmin_T ECE(s_{k−1} · σ(z_k / T), y_k) over the rows
    with ℓ ≥ k, where s_{k−1} uses the T_<k fitted before it. A position with fewer than
    ``min_rows`` observed rows keeps T = 1."""
    z = np.asarray(z, dtype=np.float64)
    assert z.ndim == 2 and y.shape == z.shape == observed.shape, (z.shape, y.shape, observed.shape)
    gamma = z.shape[1]
    temps = np.ones(gamma)
    for k in range(gamma):
        rows = observed[:, k]
        if int(rows.sum()) < min_rows:
            continue
        prior = survival(z[rows, :k], temps[:k])[:, -1] if k else np.ones(int(rows.sum()))
        temps[k] = fit_temperature(z[rows, k], prior, y[rows, k], bins=bins, t_range=t_range)
    return temps


# ------------------------------------------------------------------------------ report
@dataclass
class PositionCalibration:
    """Calibration of prefix survival at one block position (1-based), before and after STS."""

    position: int
    rows: int  # steps with ℓ ≥ k
    accept_rate: float  # mean of 1[a ≥ k] over those rows
    temperature_before: float
    temperature: float  # fitted T_k
    ece_before: float
    ece_after: float
    auroc_before: float
    auroc_after: float
    brier_before: float
    brier_after: float
    # reliability diagram: per bin [mean prediction, fraction accepted, count] (NaN-free: empty bins dropped)
    reliability_before: list[list[float]] = field(default_factory=list)
    reliability_after: list[list[float]] = field(default_factory=list)


@dataclass
class CalibrationReport:
    bins: int
    t_range: tuple[float, float]
    temperatures_before: list[float]
    temperatures: list[float]
    positions: list[PositionCalibration]
    source: str = ""  # what the steps came from (data set, sampling temperatures, prompts)

    def mean(self, metric: str) -> float:
        """Unweighted mean over positions that have rows, e.g. ``mean("ece_after")``."""
        vals = [getattr(p, metric) for p in self.positions if p.rows and not math.isnan(getattr(p, metric))]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def save_json(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationReport":
        nan = float("nan")
        positions = [PositionCalibration(**{k: (nan if v is None else v) for k, v in p.items()}) for p in d["positions"]]
        return cls(d["bins"], tuple(d["t_range"]), d["temperatures_before"], d["temperatures"], positions, d.get("source", ""))

    def markdown(self) -> str:
        from dspark.platform.bench.report import markdown_table

        def f(x: float, nd: int = 3) -> str:
            return "–" if x is None or math.isnan(x) else f"{x:.{nd}f}"

        rows = [
            [p.position, p.rows, f(p.accept_rate), f(p.temperature), f"{f(p.ece_before)} → {f(p.ece_after)}",
             f"{f(p.auroc_before)} → {f(p.auroc_after)}", f"{f(p.brier_before)} → {f(p.brier_after)}"]
            for p in self.positions
        ]
        rows.append(["mean", "", "", "", f"{f(self.mean('ece_before'))} → {f(self.mean('ece_after'))}",
                     f"{f(self.mean('auroc_before'))} → {f(self.mean('auroc_after'))}",
                     f"{f(self.mean('brier_before'))} → {f(self.mean('brier_after'))}"])
        head = ["k", "steps with ℓ ≥ k", "accept@k", "T_k", f"ECE ({self.bins} bins)", "AUROC", "Brier"]
        return markdown_table(head, rows)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write a JSON-safe dict (see :func:`json_safe`) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def json_safe(x: Any) -> Any:
    """NaN/inf → None, tuples → lists, numpy scalars → Python (strict JSON)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _reliability(p: np.ndarray, y: np.ndarray, bins: int) -> list[list[float]]:
    mean_p, frac, n = reliability_bins(p, y, bins)
    return [[float(mean_p[b]), float(frac[b]), int(n[b])] for b in range(bins) if n[b]]


def calibration_report(
    z: np.ndarray,  # [N, γ] uncalibrated confidence logits
    y: np.ndarray,  # [N, γ] bool prefix outcomes
    observed: np.ndarray,  # [N, γ] bool ℓ ≥ k
    temperatures: np.ndarray,  # [γ] fitted
    temperatures_before: np.ndarray | None = None,  # [γ] what was in use before (default ones)
    *,
    bins: int = 20,
    t_range: tuple[float, float] = (0.05, 20.0),
    source: str = "",
) -> CalibrationReport:
    """ECE / AUROC / Brier of prefix survival, per position, with the old and the new temperatures."""
    gamma = z.shape[1]
    before_t = np.ones(gamma) if temperatures_before is None else np.asarray(temperatures_before, dtype=np.float64)
    s_before, s_after = survival(z, before_t), survival(z, temperatures)  # [N, γ] each
    positions = []
    for k in range(gamma):
        rows = observed[:, k]
        pb, pa, yk = s_before[rows, k], s_after[rows, k], y[rows, k]
        positions.append(PositionCalibration(
            position=k + 1, rows=int(rows.sum()), accept_rate=float(yk.mean()) if yk.size else float("nan"),
            temperature_before=float(before_t[k]), temperature=float(temperatures[k]),
            ece_before=ece(pb, yk, bins), ece_after=ece(pa, yk, bins),
            auroc_before=auroc(pb, yk), auroc_after=auroc(pa, yk),
            brier_before=brier(pb, yk), brier_after=brier(pa, yk),
            reliability_before=_reliability(pb, yk, bins), reliability_after=_reliability(pa, yk, bins),
        ))
    return CalibrationReport(bins, tuple(t_range), [float(t) for t in before_t], [float(t) for t in temperatures],
                             positions, source)


def plot_reliability(report: CalibrationReport, path: str | Path) -> Path:
    """One reliability panel per position (fraction accepted against mean predicted survival, per
    bin, before and after STS; marker area ∝ bin count), plus a panel of ECE by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gamma = len(report.positions)
    ncols = min(4, gamma + 1)
    nrows = math.ceil((gamma + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, p in zip(flat, report.positions):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for pts, color, label in ((p.reliability_before, "tab:red", "before"), (p.reliability_after, "tab:blue", "after STS")):
            if pts:
                arr = np.array(pts)
                ax.plot(arr[:, 0], arr[:, 1], "-", color=color, lw=1, alpha=0.6)
                ax.scatter(arr[:, 0], arr[:, 1], s=8 + 60 * arr[:, 2] / max(arr[:, 2].max(), 1), color=color, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"k={p.position}: ECE {_pct(p.ece_before)} → {_pct(p.ece_after)}, T={p.temperature:.2f}", fontsize=8)
        ax.set_xlabel("predicted prefix survival", fontsize=8)
        ax.set_ylabel("fraction with a ≥ k", fontsize=8)
        ax.tick_params(labelsize=7)
    flat[0].legend(fontsize=7, loc="upper left")
    ax = flat[gamma]
    ks = np.arange(1, gamma + 1)
    ax.bar(ks - 0.2, [p.ece_before for p in report.positions], 0.4, color="tab:red", label="before")
    ax.bar(ks + 0.2, [p.ece_after for p in report.positions], 0.4, color="tab:blue", label="after STS")
    ax.set_xticks(ks)
    ax.set_xlabel("block position k", fontsize=8)
    ax.set_ylabel(f"ECE ({report.bins} bins)", fontsize=8)
    ax.set_title("ECE of prefix survival", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    for extra in flat[gamma + 1:]:
        extra.axis("off")
    fig.suptitle("Confidence calibration (Sequential Temperature Scaling)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------ runner
def calibrate_drafter(
    target: Any,  # FrozenTarget
    drafter: Any,  # a Drafter with a confidence head
    prompts: Sequence[Any],  # Prompt records (dspark.platform.training.prompts)
    *,
    temperatures: Sequence[float] = (1.0,),  # sampling temperatures the steps are collected at (pooled)
    max_tokens: int = 128,
    engine: Any = None,  # EngineConfig
    seed: int = 0,
    bins: int = 20,
    t_range: tuple[float, float] = (0.05, 20.0),
    min_rows: int = 20,
    install: bool = True,
    source: str = "",
) -> CalibrationReport:
    """Run ``prompts`` through the real engine (whole-block verification) and fit STS on the
    steps. "Before" means the temperatures the drafter had; "after" means the fitted ones. Both are
    measured on the same steps as the fit. The raw logits are recovered from confidences taken
    with the drafter's temperatures reset to ones. ``install`` puts the fitted temperatures into
    the drafter (``set_confidence_temperature``)."""
    import torch

    from dspark.platform.training.evaluate import run_prompts

    gamma = int(drafter.block_size)
    buf = getattr(drafter, "confidence_temperature", None)
    before = buf.detach().float().cpu().numpy().astype(np.float64) if buf is not None else np.ones(gamma)
    tables: list[StepTable] = []
    try:
        if buf is not None:
            drafter.set_confidence_temperature(torch.ones(gamma))
        for temp in temperatures:
            table, _ = run_prompts(target, drafter, prompts, temperature=float(temp), max_tokens=max_tokens,
                                   engine=engine, seed=seed)
            tables.append(table)
    finally:
        if buf is not None:
            drafter.set_confidence_temperature(torch.as_tensor(before))
    lengths = np.concatenate([t.lengths for t in tables])
    accepted = np.concatenate([t.accepted for t in tables])
    if any(t.confidences is None for t in tables):
        raise CalibrationError("the drafter produced no confidences (it has no confidence head): nothing to calibrate")
    conf = np.concatenate([t.confidences for t in tables])  # [N, γ]
    keep = ~np.isnan(conf).any(axis=1) & (lengths > 0)  # drop fallback steps and steps that verified nothing
    if not keep.any():
        raise CalibrationError("no verify step with drafts and confidences was recorded: nothing to calibrate")
    z = logit(conf[keep])
    y, observed = prefix_outcomes(lengths[keep], accepted[keep], gamma)
    fitted = fit_sts(z, y, observed, bins=bins, t_range=t_range, min_rows=min_rows)
    report = calibration_report(z, y, observed, fitted, before, bins=bins, t_range=t_range, source=source)
    if install and buf is not None:
        drafter.set_confidence_temperature(torch.as_tensor(fitted))
    return report
