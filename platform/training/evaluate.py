"""Drafter evaluation through the real speculative engine, with static verification.

The protocol follows DSpark paper §4 and DeepSpec ``eval.py``. Every data set is run at every
sampling temperature (T = 0 and T = 1 by default). The engine's ``FixedPolicy`` verifies the
whole block, and each verify step is recorded through the engine's ``observer`` hook.

Notation: row n is one request in one verify step. It verified ℓ_n drafts and accepted
a_n ≤ ℓ_n of them; c_{n,k} is the drafter's confidence for position k (1-based). ℓ can be
below γ when ``max_tokens`` clips the block, and it is 0 on a step where the drafter failed.

* τ = mean over rows of (a_n + 1). The +1 is the target's own token, so τ = tokens per
  verify step. This is the paper's "acceptance length".
* accept_rate@k = P(a ≥ k | ℓ ≥ k): prefix survival, DeepSpec's ``accept_rate@k``.
* conditional acceptance at k = P(a ≥ k | a ≥ k−1, ℓ ≥ k): paper Fig. 2.
* mean confidence at k = mean c_k over the conditional-acceptance rows (ℓ ≥ k and a ≥ k−1),
  so it is directly comparable with conditional acceptance (c_k estimates exactly that).
* mean survival at k = mean Π_{j≤k} c_j over rows with ℓ ≥ k, comparable with accept_rate@k.
  The ECE and AUROC columns measure that prediction against 1[a ≥ k]; see
  :mod:`~dspark.platform.training.calibration`.

These agree with the engine's own ``RequestStats``: pooled over requests,
τ = Σ(accepted + steps) / Σ steps and accept@k = Σ accepted_at[k] / Σ proposed_at[k].
Positions that no step verified get NaN in memory and ``null`` in JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from dspark.platform.config import DemoTargetConfig, EngineConfig, StrictModel, TargetConfig

if TYPE_CHECKING:
    from dspark.platform.contracts import RequestOutput
    from dspark.platform.training.prompts import Prompt
    from dspark.verifier_service.engine import StepRecord

__all__ = [
    "CalibrationSettings",
    "EvalConfig",
    "StepTable",
    "StepCollector",
    "tau",
    "proposed_at",
    "accept_rate_at",
    "conditional_accept_at",
    "mean_confidence_at",
    "mean_survival_at",
    "RunMetrics",
    "EvalResult",
    "summarize",
    "load_prompts",
    "run_static",
    "run_prompts",
    "evaluate_drafter",
    "plot_positions",
]

CORPUS_SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------ config
def _valid_temperatures(v: tuple[float, ...]) -> tuple[float, ...]:
    if not v:
        raise ValueError("name at least one sampling temperature")
    if any(not (0.0 <= t <= 10.0) for t in v):
        raise ValueError("sampling temperatures must be in [0, 10]")
    if len(set(v)) != len(v):
        raise ValueError("sampling temperatures must be distinct")
    return v


class CalibrationSettings(StrictModel):
    """What `dspark calibrate` fits Sequential Temperature Scaling on."""

    data: str = Field(
        "validation", min_length=1,
        description="Demo-corpus split (train/validation/test) or a JSONL prompt file. Keep it apart from the evaluation data.",
    )
    temperatures: tuple[float, ...] = Field(
        (1.0,), description="Sampling temperatures to collect steps at. Steps from all of them are pooled into one fit.",
    )
    t_min: float = Field(0.05, gt=0, description="Smallest temperature the search may pick.")
    t_max: float = Field(20.0, gt=0, description="Largest temperature the search may pick.")
    min_rows: int = Field(20, ge=1, description="Positions with fewer verified steps keep T = 1.")

    @field_validator("temperatures")
    @classmethod
    def _check_temperatures(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return _valid_temperatures(v)

    @model_validator(mode="after")
    def _check_range(self) -> "CalibrationSettings":
        if self.t_min >= self.t_max:
            raise ValueError("t_min must be below t_max")
        return self


class EvalConfig(StrictModel):
    """What `dspark eval` and `dspark calibrate` run: the target, the engine, the prompt sets and
    the sampling temperatures. The drafter comes from its checkpoint directory."""

    target: TargetConfig = Field(default_factory=TargetConfig, description="The target model.")
    demo_target: DemoTargetConfig = Field(
        default_factory=DemoTargetConfig,
        description="The demo target (used when target.path is 'demo'). Its split fractions and corpus cap also pick the corpus prompts.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The verifier engine.")
    data: tuple[str, ...] = Field(
        ("test",), description="Data sets: demo-corpus splits (train/validation/test) or JSONL prompt files.",
    )
    temperatures: tuple[float, ...] = Field((0.0, 1.0), description="Sampling temperatures (0 = greedy).")
    num_prompts: int = Field(64, ge=1, le=100_000, description="Prompts per data set, at most.")
    max_tokens: int = Field(128, ge=1, le=65536, description="New tokens per request.")
    prompt_min_tokens: int = Field(16, ge=1, description="Shortest corpus prompt, in tokens.")
    prompt_max_tokens: int = Field(96, ge=1, description="Longest corpus prompt, in tokens.")
    seed: int = Field(0, ge=0, description="Seeds the choice of corpus prompts and each request's sampling.")
    bins: int = Field(20, ge=2, le=1000, description="Equal-width bins for ECE and reliability diagrams.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings, description="`dspark calibrate` only.")

    @field_validator("temperatures")
    @classmethod
    def _check_temperatures(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return _valid_temperatures(v)

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(not s for s in v):
            raise ValueError("name at least one data set (a corpus split or a JSONL file)")
        if len(set(v)) != len(v):
            raise ValueError("data sets must be distinct")
        return v

    @model_validator(mode="after")
    def _check_prompt_lengths(self) -> "EvalConfig":
        if self.prompt_min_tokens > self.prompt_max_tokens:
            raise ValueError("prompt_min_tokens must not exceed prompt_max_tokens")
        return self


# ------------------------------------------------------------------------------ step records
@dataclass(frozen=True)
class StepTable:
    """The verify steps of one run, one row per (step, request)."""

    gamma: int
    lengths: np.ndarray  # [N] int64 ℓ_n
    accepted: np.ndarray  # [N] int64 a_n ≤ ℓ_n
    confidences: np.ndarray | None  # [N, γ] float64 c_{n,k} as emitted (NaN on fallback rows); None without a head
    fallback: np.ndarray  # [N] bool: the drafter failed on this step


class StepCollector:
    """The engine's ``observer``: keeps every :class:`StepRecord` and turns them into a table."""

    def __init__(self, gamma: int):
        self.gamma = int(gamma)
        self.records: list[StepRecord] = []

    def __call__(self, record: "StepRecord") -> None:
        self.records.append(record)

    def table(self) -> StepTable:
        g = self.gamma
        lengths = np.array([l for r in self.records for l in r.lengths], dtype=np.int64)
        accepted = np.array([a for r in self.records for a in r.accepted], dtype=np.int64)
        fallback = np.array([r.fallback for r in self.records for _ in r.lengths], dtype=bool)
        conf = None
        if any(r.confidences is not None for r in self.records):
            parts = [
                np.asarray(r.confidences, dtype=np.float64).reshape(len(r.lengths), g)
                if r.confidences is not None else np.full((len(r.lengths), g), np.nan)
                for r in self.records
            ]
            conf = np.concatenate(parts) if parts else np.zeros((0, g))
        return StepTable(g, lengths, accepted, conf, fallback)


# ------------------------------------------------------------------------------ aggregation (pure)
def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:  # [γ] / [γ], NaN where den = 0
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def tau(accepted: np.ndarray) -> float:  # [N] a_n -> mean(a + 1); NaN when empty
    accepted = np.asarray(accepted)
    return float(np.mean(accepted + 1)) if accepted.size else float("nan")


def proposed_at(lengths: np.ndarray, gamma: int) -> np.ndarray:  # [N] ℓ -> [γ] #rows with ℓ ≥ k
    return (np.asarray(lengths)[:, None] >= np.arange(1, gamma + 1)[None]).sum(axis=0)


def accept_rate_at(
    lengths: np.ndarray,  # [N] ℓ
    accepted: np.ndarray,  # [N] a
    gamma: int,
) -> np.ndarray:  # [γ] P(a ≥ k | ℓ ≥ k)
    """Example: ℓ = [3, 3, 2, 0], a = [3, 1, 0, 0] → [2/3, 1/3, 1/2]."""
    k = np.arange(1, gamma + 1)[None]
    lengths, accepted = np.asarray(lengths)[:, None], np.asarray(accepted)[:, None]
    return _ratio(((accepted >= k) & (lengths >= k)).sum(0), (lengths >= k).sum(0))


def conditional_accept_at(
    lengths: np.ndarray,  # [N] ℓ
    accepted: np.ndarray,  # [N] a
    gamma: int,
) -> np.ndarray:  # [γ] P(a ≥ k | a ≥ k−1, ℓ ≥ k)
    """Example: ℓ = [3, 3, 2, 0], a = [3, 1, 0, 0] → [2/3, 1/2, 1]."""
    k = np.arange(1, gamma + 1)[None]
    lengths, accepted = np.asarray(lengths)[:, None], np.asarray(accepted)[:, None]
    reached = (lengths >= k) & (accepted >= k - 1)
    return _ratio((reached & (accepted >= k)).sum(0), reached.sum(0))


def mean_confidence_at(
    confidences: np.ndarray,  # [N, γ] c_k
    lengths: np.ndarray,  # [N] ℓ
    accepted: np.ndarray,  # [N] a
) -> np.ndarray:  # [γ] mean c_k over rows with ℓ ≥ k and a ≥ k−1 (NaN rows skipped)
    c = np.asarray(confidences, dtype=np.float64)
    k = np.arange(1, c.shape[1] + 1)[None]
    rows = (np.asarray(lengths)[:, None] >= k) & (np.asarray(accepted)[:, None] >= k - 1) & ~np.isnan(c)
    return _ratio(np.where(rows, c, 0.0).sum(0), rows.sum(0))


def mean_survival_at(
    confidences: np.ndarray,  # [N, γ] c_k
    lengths: np.ndarray,  # [N] ℓ
) -> np.ndarray:  # [γ] mean Π_{j≤k} c_j over rows with ℓ ≥ k (NaN rows skipped)
    c = np.asarray(confidences, dtype=np.float64)
    s = np.cumprod(c, axis=1)
    rows = (np.asarray(lengths)[:, None] >= np.arange(1, c.shape[1] + 1)[None]) & ~np.isnan(s)
    return _ratio(np.where(rows, s, 0.0).sum(0), rows.sum(0))


# ------------------------------------------------------------------------------ results
@dataclass
class RunMetrics:
    """One (data set, sampling temperature) run. Per-position lists have γ entries (position k at
    index k−1)."""

    data: str
    temperature: float
    prompts: int
    steps: int  # rows: verify steps summed over requests
    fallback_steps: int
    drafted: int  # Σ ℓ
    accepted: int  # Σ a
    tokens: int  # tokens generated (prefill's first token and stop truncation included)
    tau: float
    proposed_at: list[int]
    accept_rate_at: list[float]
    conditional_accept_at: list[float]
    mean_confidence_at: list[float] = field(default_factory=list)  # empty without a confidence head
    mean_survival_at: list[float] = field(default_factory=list)
    ece_at: list[float] = field(default_factory=list)  # of prefix survival vs 1[a ≥ k]
    auroc_at: list[float] = field(default_factory=list)


def summarize(table: StepTable, *, data: str, temperature: float, prompts: int, tokens: int, bins: int = 20) -> RunMetrics:
    """Every metric of one run, from its step table."""
    from dspark.platform.training.calibration import auroc, ece, prefix_outcomes

    g, L, A = table.gamma, table.lengths, table.accepted
    m = RunMetrics(
        data=data, temperature=float(temperature), prompts=int(prompts), steps=int(L.size),
        fallback_steps=int(table.fallback.sum()), drafted=int(L.sum()), accepted=int(A.sum()), tokens=int(tokens),
        tau=tau(A), proposed_at=[int(x) for x in proposed_at(L, g)],
        accept_rate_at=accept_rate_at(L, A, g).tolist(), conditional_accept_at=conditional_accept_at(L, A, g).tolist(),
    )
    if table.confidences is not None:
        c = table.confidences
        m.mean_confidence_at = mean_confidence_at(c, L, A).tolist()
        m.mean_survival_at = mean_survival_at(c, L).tolist()
        s = np.cumprod(c, axis=1)  # [N, γ]
        y, observed = prefix_outcomes(L, A, g)
        for k in range(g):
            rows = observed[:, k] & ~np.isnan(s[:, k])
            m.ece_at.append(ece(s[rows, k], y[rows, k], bins))
            m.auroc_at.append(auroc(s[rows, k], y[rows, k]))
    return m


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _nanmean(xs: Sequence[float]) -> float:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(vals)) if vals else float("nan")


@dataclass
class EvalResult:
    drafter: str  # checkpoint directory (or a name)
    kind: str
    gamma: int
    target: str
    confidence_temperature: list[float]  # STS temperatures the drafter ran with
    bins: int
    runs: list[RunMetrics]

    def to_dict(self) -> dict[str, Any]:
        from dspark.platform.training.calibration import json_safe

        return json_safe(asdict(self))

    def save_json(self, path: str | Path) -> Path:
        from dspark.platform.training.calibration import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        def nan(v):
            return [float("nan") if x is None else x for x in v] if isinstance(v, list) else (float("nan") if v is None else v)

        runs = [RunMetrics(**{k: nan(v) for k, v in r.items()}) for r in d["runs"]]
        return cls(d["drafter"], d["kind"], d["gamma"], d["target"], d["confidence_temperature"], d["bins"], runs)

    def markdown(self) -> str:
        """A summary table (one row per data set × temperature) and a per-position table."""
        from dspark.platform.bench.report import markdown_table

        summary = markdown_table(
            ["data", "T", "prompts", "steps", "tokens", "τ", "accept@1", f"mean ECE ({self.bins} bins)", "mean AUROC"],
            [[r.data, f"{r.temperature:g}", r.prompts, r.steps, r.tokens, _f(r.tau, 2), _f(r.accept_rate_at[0] if r.accept_rate_at else None),
              _f(_nanmean(r.ece_at)), _f(_nanmean(r.auroc_at))] for r in self.runs],
        )
        rows = []
        for r in self.runs:
            for label, vals in (("accept@k", r.accept_rate_at), ("conditional acceptance", r.conditional_accept_at),
                                ("mean confidence c_k", r.mean_confidence_at)):
                if vals:
                    rows.append([r.data, f"{r.temperature:g}", label, *[_f(v, 2) for v in vals]])
        per_pos = markdown_table(["data", "T", "metric", *[f"k={k}" for k in range(1, self.gamma + 1)]], rows)
        return f"{summary}\n\n{per_pos}"


def plot_positions(result: EvalResult, path: str | Path) -> Path:
    """Two panels against block position: accept_rate@k, and conditional acceptance (solid) with
    the mean confidence c_k on the same rows (dotted). One colour per data set × temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    ks = np.arange(1, result.gamma + 1)
    for i, r in enumerate(result.runs):
        color = f"C{i % 10}"
        label = f"{r.data}, T={r.temperature:g} (τ={_f(r.tau, 2)})"
        ax1.plot(ks, r.accept_rate_at, "o-", color=color, label=label)
        ax2.plot(ks, r.conditional_accept_at, "o-", color=color, label=label)
        if r.mean_confidence_at:
            ax2.plot(ks, r.mean_confidence_at, ":", color=color, lw=1.5)
    ax1.set_title("accept_rate@k = P(a ≥ k | ℓ ≥ k)", fontsize=9)
    ax2.set_title("conditional acceptance P(a ≥ k | a ≥ k−1) (dotted: mean c_k)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(ks)
        ax.set_xlabel("block position k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("rate")
    ax1.legend(fontsize=7)
    fig.suptitle(f"{Path(result.drafter).name} ({result.kind}, γ={result.gamma})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ runner
def load_prompts(tokenizer: Any, spec: str, cfg: EvalConfig) -> tuple[str, list["Prompt"]]:
    """(name, prompts) of one data set. ``spec`` is a corpus split or a JSONL path."""
    from dspark.platform.training.prompts import PromptSourceError, corpus_prompts, jsonl_prompts

    if tokenizer is None:
        raise PromptSourceError("evaluation prompts need a target loaded with its tokenizer")
    if spec in CORPUS_SPLITS:
        prompts = corpus_prompts(
            tokenizer, spec, cfg.num_prompts, min_tokens=cfg.prompt_min_tokens, max_tokens=cfg.prompt_max_tokens,
            seed=cfg.seed, fractions=cfg.demo_target.split_fractions, max_corpus_mb=cfg.demo_target.max_corpus_mb,
        )
        name = spec
    else:
        prompts = list(jsonl_prompts(tokenizer, spec, limit=cfg.num_prompts))
        name = Path(spec).name
    if not prompts:
        raise PromptSourceError(f"data set {spec!r} gave no prompts")
    return name, prompts


def run_static(
    target: Any,  # FrozenTarget
    drafter: Any,  # Drafter (or any object with its methods)
    requests: Sequence[tuple[str, Sequence[int]]],  # (request id, prompt token ids)
    *,
    temperature: float,
    max_tokens: int,
    engine: EngineConfig | None = None,
    seed: int = 0,
    observer: Any = None,  # step observer (StepRecord -> None)
) -> dict[str, "RequestOutput"]:
    """Run requests through a fresh engine with whole-block verification (``FixedPolicy()``);
    request i samples with seed ``seed·1_000_003 + i``. The one runner evaluation, calibration
    and trace recording share, so their numbers come from identical engine settings. Sampled
    rows are verified by chain rejection sampling even though they carry seeds
    (``reproducible_seeds=False``): τ, the acceptance the confidence head is calibrated to and the
    traces are those of rejection sampling, the paper's measure and what unseeded traffic sees."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.scheduler.policies import FixedPolicy
    from dspark.verifier_service.engine import VerifierEngine

    engine = engine or EngineConfig()
    eng = VerifierEngine(
        target, drafter, FixedPolicy(), max_batch_size=engine.max_batch_size, max_model_len=engine.max_model_len,
        prefill_chunk=engine.prefill_chunk, seed=engine.seed, observer=observer, reproducible_seeds=False,
    )
    return eng.generate(
        GenerationRequest(rid, tuple(int(t) for t in ids),
                          SamplingParams(max_tokens=max_tokens, temperature=float(temperature), seed=seed * 1_000_003 + i))
        for i, (rid, ids) in enumerate(requests)
    )


def run_prompts(
    target: Any,  # FrozenTarget
    drafter: Any,  # Drafter (or any object with its methods)
    prompts: Sequence["Prompt"],
    *,
    temperature: float,
    max_tokens: int,
    engine: EngineConfig | None = None,
    seed: int = 0,
) -> tuple[StepTable, dict[str, "RequestOutput"]]:
    """Every prompt through :func:`run_static`. Returns the step table and each request's final
    output, keyed ``"<i>:<prompt id>"``."""
    collector = StepCollector(int(drafter.block_size))
    outputs = run_static(target, drafter, [(f"{i}:{p.id}", p.token_ids) for i, p in enumerate(prompts)],
                         temperature=temperature, max_tokens=max_tokens, engine=engine, seed=seed, observer=collector)
    return collector.table(), outputs


def evaluate_drafter(
    target: Any,
    drafter: Any,
    datasets: Mapping[str, Sequence["Prompt"]],  # name -> prompts
    *,
    temperatures: Sequence[float] = (0.0, 1.0),
    max_tokens: int = 128,
    engine: EngineConfig | None = None,
    seed: int = 0,
    bins: int = 20,
    name: str = "",
    target_name: str = "",
) -> EvalResult:
    """Run every data set at every temperature and summarise each run."""
    runs = []
    for data, prompts in datasets.items():
        for t in temperatures:
            table, outputs = run_prompts(target, drafter, prompts, temperature=t, max_tokens=max_tokens, engine=engine, seed=seed)
            tokens = sum(len(o.token_ids) for o in outputs.values())
            runs.append(summarize(table, data=data, temperature=t, prompts=len(prompts), tokens=tokens, bins=bins))
    temps = getattr(drafter, "confidence_temperature", None)
    temps = [float(x) for x in temps.tolist()] if temps is not None else [1.0] * int(drafter.block_size)
    kind = getattr(getattr(drafter, "cfg", None), "kind", type(drafter).__name__)
    return EvalResult(name or type(drafter).__name__, kind, int(drafter.block_size), target_name, temps, bins, runs)
