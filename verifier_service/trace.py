"""Engine traces: what every verify step drafted and how much of it the target would accept, so
verify-length policies can be replayed offline (``dspark.scheduler.simulator``).

Notation as in ``engine.py``: row n is one request in one verify step; the engine verified ℓ_n
drafts and accepted a_n ≤ ℓ_n of them; c_{n,k} is the drafter's confidence at block position k.

The trace is recorded with the engine verifying the *whole* block (``FixedPolicy()``, ℓ = γ).
Acceptance is prefix-closed: the verdict on draft k depends only on the anchor and d_1..d_k (the
target's forward is causal) and on draft k's own uniform, so a policy that had verified only the
first ℓ drafts would have accepted min(a, ℓ). One full-block outcome therefore answers every
shorter prefix, and a trace fixes the outcome of any policy's choice.

A row's full-block acceptance is *known* when the engine verified the whole block (ℓ = γ) or
rejected inside the prefix it verified (a < ℓ). It is only a lower bound on the *censored* rows
(a = ℓ < γ): the last step of a request clipped by ``max_tokens``, a step where the drafter
failed (ℓ = 0) or a request that lost its drafter context. Replays use known rows only.

File format (``.npz``, ``numpy.load(allow_pickle=False)`` reads it):

* ``header``: a JSON string: ``format`` ("dspark-trace"), ``version``, ``target``, ``drafter``,
  ``gamma``, ``temperature``, ``max_tokens``, ``seed``, ``has_confidences``, ``created`` and
  ``prompts`` (a list of ``{"id", "token_ids"}``; row field ``request`` indexes it);
* one array per row field, rows in engine-step order: ``step`` [N] int32 (engine verify step),
  ``request`` [N] int32, ``verified`` [N] int16 (ℓ), ``accepted`` [N] int16 (a),
  ``fallback`` [N] bool, and ``confidences`` [N, γ] float32 when the drafter has a confidence
  head (NaN where a step had none).

Only numpy and the standard library are imported at module level; :func:`record_trace` loads
the engine (and torch) when called.
"""

from __future__ import annotations

import datetime as _dt
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

if TYPE_CHECKING:
    from dspark.platform.config import EngineConfig
    from dspark.platform.contracts import RequestOutput
    from dspark.scheduler.simulator import Trajectories
    from dspark.verifier_service.engine import StepRecord

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "TraceFormatError",
    "Trace",
    "TraceRecorder",
    "save_trace",
    "load_trace",
    "record_trace",
    "seeded",
]

TRACE_FORMAT = "dspark-trace"
TRACE_VERSION = 1
_FIELDS = ("step", "request", "verified", "accepted", "fallback")

T = TypeVar("T")


class TraceFormatError(ValueError):
    """A file is not a readable dspark trace (message is for users)."""


@dataclass(frozen=True)
class Trace:
    """The verify steps of one recording, one row per (step, request)."""

    header: dict[str, Any]
    step: np.ndarray  # [N] int32 engine verify step
    request: np.ndarray  # [N] int32 index into header["prompts"]
    verified: np.ndarray  # [N] int16 ℓ_n the engine verified (γ unless clipped; 0 on fallback)
    accepted: np.ndarray  # [N] int16 a_n ≤ ℓ_n
    fallback: np.ndarray  # [N] bool: the drafter failed on this step
    confidences: np.ndarray | None = field(default=None)  # [N, γ] float32 c_{n,k}; None without a head

    def __post_init__(self) -> None:
        n = self.step.shape[0]
        for name in _FIELDS:
            arr = getattr(self, name)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise TraceFormatError(f"trace field {name!r} has shape {arr.shape}, expected ({n},)")
        if self.confidences is not None and self.confidences.shape != (n, self.gamma):
            raise TraceFormatError(f"trace confidences have shape {self.confidences.shape}, expected ({n}, {self.gamma})")
        if n and (np.any(self.accepted > self.verified) or np.any(self.verified > self.gamma) or np.any(self.accepted < 0)):
            raise TraceFormatError("trace rows must satisfy 0 <= accepted <= verified <= gamma")

    @property
    def gamma(self) -> int:
        return int(self.header["gamma"])

    @property
    def num_rows(self) -> int:
        return int(self.step.shape[0])

    @property
    def known(self) -> np.ndarray:  # [N] bool: the full-block acceptance of the row is exact
        return (self.verified == self.gamma) | (self.accepted < self.verified)

    def tau(self) -> float:
        """Recorded τ = mean (a + 1) over the known rows: tokens per request per verify step."""
        a = self.accepted[self.known]
        return float(np.mean(a + 1.0)) if a.size else float("nan")

    def trajectories(self) -> "Trajectories":
        """The known rows grouped per request in step order, for the simulator."""
        from dspark.scheduler.simulator import Trajectories

        return Trajectories.from_rows(self.request, self.step, self.accepted, self.confidences, self.known, self.gamma)

    def describe(self) -> str:
        h = self.header
        return (
            f"{len(h['prompts'])} requests, {self.num_rows} rows ({int(self.known.sum())} known), γ = {self.gamma}, "
            f"T = {h['temperature']:g}, τ = {self.tau():.3f}; drafter {h['drafter']}, target {h['target']}"
        )


class TraceRecorder:
    """The engine's ``observer``: keeps every :class:`StepRecord` and turns them into a :class:`Trace`.

    ``request_ids`` are the engine request ids in prompt order (row field ``request`` indexes it)."""

    def __init__(self, gamma: int, request_ids: Sequence[str]):
        self.gamma = int(gamma)
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        if len(self.index) != len(request_ids):
            raise ValueError("request ids must be distinct")
        self.records: list[StepRecord] = []

    def __call__(self, record: "StepRecord") -> None:
        self.records.append(record)

    def trace(self, header: dict[str, Any]) -> Trace:
        from dspark.platform.training.evaluate import StepCollector

        collector = StepCollector(self.gamma)  # the evaluation's own table: ℓ, a, c (NaN-filled), fallback
        collector.records = self.records
        table = collector.table()
        step = np.array([s for s, r in enumerate(self.records) for _ in r.request_ids], dtype=np.int32)
        request = np.array([self.index[rid] for r in self.records for rid in r.request_ids], dtype=np.int32)
        conf = None if table.confidences is None else table.confidences.astype(np.float32)
        header = {**header, "gamma": self.gamma, "has_confidences": conf is not None}
        return Trace(header, step, request, table.lengths.astype(np.int16), table.accepted.astype(np.int16),
                     table.fallback.astype(bool), conf)


# ------------------------------------------------------------------------------------ file I/O
def save_trace(trace: Trace, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, **trace.header}
    arrays = {name: getattr(trace, name) for name in _FIELDS}
    if trace.confidences is not None:
        arrays["confidences"] = trace.confidences
    with open(path, "wb") as fh:  # a file handle: numpy would otherwise append ".npz" to other names
        np.savez_compressed(fh, header=np.array(json.dumps(header)), **arrays)
    return path


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by :func:`save_trace`; :class:`TraceFormatError` says what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TraceFormatError(f"trace file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise TraceFormatError(f"{path} is not a trace file (.npz): {exc}") from None
    try:
        header = json.loads(str(data.pop("header")))
    except (KeyError, ValueError):
        raise TraceFormatError(f"{path} has no trace header") from None
    if header.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"{path} is not a dspark trace (format {header.get('format')!r})")
    if header.get("version") != TRACE_VERSION:
        raise TraceFormatError(f"{path}: trace format version {header.get('version')} (this dspark reads {TRACE_VERSION})")
    missing = [k for k in _FIELDS if k not in data]
    if missing or "gamma" not in header or "prompts" not in header:
        raise TraceFormatError(f"{path}: trace is missing {', '.join(missing) or 'header fields'}")
    return Trace(header, data["step"], data["request"], data["verified"], data["accepted"], data["fallback"].astype(bool),
                 data.get("confidences"))


# ------------------------------------------------------------------------------------ recording
def seeded(make: Callable[[], T], seed: int) -> T:
    """``make()`` with torch's global RNG seeded first, so an untrained drafter is the same every run."""
    import torch

    torch.manual_seed(seed)
    return make()


def record_trace(
    target: Any,  # FrozenTarget
    drafter: Any,  # Drafter (or any object with its methods); its block size is γ
    prompts: Sequence[Any],  # Prompt objects (``id``, ``token_ids``) or token-id sequences
    *,
    temperature: float = 0.0,
    max_tokens: int = 128,
    engine: "EngineConfig | None" = None,
    seed: int = 0,
    target_name: str = "",
    drafter_name: str = "",
) -> tuple[Trace, dict[str, "RequestOutput"]]:
    """Run ``prompts`` through the real engine with whole-block verification and record every step.
    Request i (id ``"<i>:<prompt id>"``) samples with seed ``seed·1_000_003 + i``, as ``dspark eval``
    does. Returns the trace and each request's final output (with the engine's own statistics)."""
    from dspark.platform.config import EngineConfig
    from dspark.platform.training.evaluate import run_static

    engine = engine or EngineConfig()
    gamma = int(drafter.block_size)
    items = [(str(getattr(p, "id", i)), tuple(int(t) for t in getattr(p, "token_ids", p))) for i, p in enumerate(prompts)]
    if not items:
        raise ValueError("record_trace needs at least one prompt")
    request_ids = [f"{i}:{pid}" for i, (pid, _) in enumerate(items)]
    recorder = TraceRecorder(gamma, request_ids)
    outputs = run_static(target, drafter, [(rid, ids) for rid, (_, ids) in zip(request_ids, items)],
                         temperature=temperature, max_tokens=max_tokens, engine=engine, seed=seed, observer=recorder)
    header = {
        "target": target_name or type(target.model).__name__,
        "drafter": drafter_name or type(drafter).__name__,
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "seed": int(seed),
        "max_batch_size": int(engine.max_batch_size),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "prompts": [{"id": pid, "token_ids": list(ids)} for pid, ids in items],
    }
    return recorder.trace(header), outputs
