"""Measuring the verifier's step-cost profile SPS(B) (``dspark.scheduler.sps.SPSProfile``).

A point of the profile is the median wall time of real verify forwards of B batch tokens,
shaped as R rows × (1 + ℓ) tokens exactly as ``VerifierEngine._verify_step`` runs them: through
the engine's slot KV cache with a committed context of ``context`` positions per row, logits at
every position, target features when the engine has a drafter. The device is synchronised
around every timed forward. Acceptance and bookkeeping are not included (small next to the
forward on a real target).

With a drafter, the profile also carries the draft cost: the median wall time of
``drafter.propose`` for R = 1..max_batch requests (an evenly spread subset when there are many),
each with a committed context of ``context`` positions (greedy sampling, the Markov loop and the
confidence head included). The policies weigh it against the verify forward it saves.

Run it on an idle engine, at replica start-up or on demand; :func:`profile_for_engine` reuses a
saved profile when its identity (target config hash, device, dtype, max batch) matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Sequence

import torch

from dspark.platform.target.loading import FrozenTarget
from dspark.scheduler.sps import SPSProfile
from dspark.verifier_service.engine import VerifierEngine

__all__ = ["engine_identity", "default_token_counts", "default_draft_rows", "measure_draft", "measure_sps",
           "profile_for_engine"]

log = logging.getLogger(__name__)


def engine_identity(engine: VerifierEngine) -> dict:
    """The identity fields an SPS profile carries for this engine."""
    cfg = engine.target.config
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {
        "target": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "")),
        "config_hash": digest,
        "device": str(engine.device),
        "dtype": str(engine.target.dtype).removeprefix("torch."),
        "max_batch": engine.max_batch_size,
    }


def default_token_counts(width: int, max_batch: int, max_points: int = 128) -> list[int]:
    """R·width for R = 1..max_batch (every R when they are at most ``max_points``, else an even
    spread): the sizes the engine runs when every request verifies ``width − 1`` drafts."""
    if max_batch <= max_points:
        rows = range(1, max_batch + 1)
    else:
        rows = sorted({round(1 + i * (max_batch - 1) / (max_points - 1)) for i in range(max_points)})
    return [r * width for r in rows]


def default_draft_rows(max_batch: int, max_points: int = 16) -> list[int]:
    """R = 1..max_batch for the draft-cost points (an even spread of at most ``max_points``)."""
    if max_batch <= max_points:
        return list(range(1, max_batch + 1))
    return sorted({round(1 + i * (max_batch - 1) / (max_points - 1)) for i in range(max_points)})


@torch.no_grad()
def measure_draft(
    engine: VerifierEngine,
    rows: Sequence[int] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    context: int = 64,
    seed: int = 0,
) -> list[tuple[int, float]]:
    """Median seconds of one draft pass (``drafter.propose``) for each request count R ->
    [(R, seconds)]. The drafter's context of slots 0..R_max−1 is filled from one real target
    forward over random tokens, and every slot is reset afterwards. Needs an idle engine."""
    from dspark.platform.sampling import SamplingBatch

    if engine.drafter is None:
        raise ValueError("the engine has no drafter")
    if engine.running or engine.waiting:
        raise RuntimeError("measure_draft needs an idle engine (its slots are used for the timing)")
    rows = sorted(set(int(r) for r in (rows or default_draft_rows(engine.max_batch_size))))
    if not rows or rows[0] < 1 or rows[-1] > engine.max_batch_size:
        raise ValueError(f"draft rows must be in 1..{engine.max_batch_size}")
    context = max(1, min(context, engine.cache.capacity - engine.gamma - 1))
    n = rows[-1]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, engine.vocab_size, (n, context), generator=gen)  # [n, context]
    slots = torch.arange(n)
    out: list[tuple[int, float]] = []
    try:
        for s in range(n):
            engine.cache.set_length(s, 0)
            engine.drafter.reset_slot(s)
        feats = engine._forward(0, ids, logits_positions=None, with_features=True)
        engine.drafter.append_context(slots, ids, feats.features, feats.last_hidden, torch.full((n,), context))
        anchors = torch.randint(0, engine.vocab_size, (n,), generator=gen)
        positions = torch.full((n,), context, dtype=torch.long)
        for r in rows:
            batch = SamplingBatch.from_params([(0.0, 0, 1.0)] * r, [None] * r)
            times = []
            for i in range(warmup + repeats):
                t0 = engine._now()
                engine.drafter.propose(slots[:r], anchors[:r], positions[:r], batch)
                if i >= warmup:
                    times.append(engine._now() - t0)
            out.append((r, statistics.median(times)))
    finally:
        for s in range(engine.max_batch_size):
            engine.cache.set_length(s, 0)
            engine.drafter.reset_slot(s)
    return out


def _shape(tokens: int, width: int, max_rows: int) -> tuple[int, int]:
    """(rows, q) with rows·q >= tokens, q <= width unless the rows would exceed ``max_rows``."""
    q = min(width, tokens)
    if math.ceil(tokens / q) > max_rows:
        q = math.ceil(tokens / max_rows)
    return math.ceil(tokens / q), q


@torch.no_grad()
def measure_sps(
    engine_or_target: VerifierEngine | FrozenTarget,
    token_counts: Sequence[int] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    width: int | None = None,
    context: int = 64,
    max_batch: int = 16,
    seed: int = 0,
    draft_rows: Sequence[int] | None = None,
) -> SPSProfile:
    """Time verify forwards of each total token count B -> an ``SPSProfile`` (steps/s = 1 / median).

    B is shaped as R = ⌈B / q⌉ rows of q = min(``width``, B) tokens (``width`` defaults to 1 + γ
    of the engine's drafter, 8 without one); when R would pass the engine's ``max_batch_size``,
    q grows instead. The point is recorded at the size actually run, R·q (equal to B when B is
    a multiple of q, as the default counts are). A bare ``FrozenTarget`` gets a temporary engine
    with ``max_batch`` slots. An engine with a drafter also gets its draft cost measured
    (:func:`measure_draft` at ``draft_rows``, default :func:`default_draft_rows`).
    """
    if repeats < 1 or warmup < 0 or context < 0:
        raise ValueError("repeats must be >= 1, warmup and context >= 0")
    engine = engine_or_target if isinstance(engine_or_target, VerifierEngine) else None
    if engine is not None and (engine.running or engine.waiting):
        raise RuntimeError("measure_sps needs an idle engine (its KV slots are used for the timing)")
    slots = engine.max_batch_size if engine is not None else max_batch
    width = width or (1 + engine.gamma if engine is not None and engine.gamma else 8)
    counts = sorted(set(int(b) for b in (token_counts or default_token_counts(width, slots))))
    if not counts or counts[0] < 1:
        raise ValueError("token counts must be >= 1")
    shapes = [_shape(b, width, slots) for b in counts]  # [(rows, q)]
    if engine is None:  # a temporary engine whose KV holds the context plus the widest row
        engine = VerifierEngine(engine_or_target, None, max_batch_size=slots,
                                max_model_len=context + max(q for _, q in shapes))
    gen = torch.Generator().manual_seed(seed)
    times: dict[int, list[float]] = {}
    try:
        for b, (rows, q) in zip(counts, shapes):
            if context + q > engine.cache.capacity:
                raise ValueError(f"B={b} needs rows of {q} tokens after a context of {context}: more than the "
                                 f"KV capacity {engine.cache.capacity}; lower context or raise max_model_len")
            ids = torch.randint(0, engine.vocab_size, (rows, q), generator=gen)  # [rows, q]
            for i in range(warmup + repeats):
                for slot in range(rows):
                    engine.cache.set_length(slot, context)  # KV content is irrelevant to the cost
                t0 = engine._now()
                engine._forward(0, ids, logits_positions=slice(None), with_features=engine.drafter is not None)
                dt = engine._now() - t0
                if i >= warmup:
                    times.setdefault(rows * q, []).append(dt)
    finally:
        for slot in range(engine.max_batch_size):
            engine.cache.set_length(slot, 0)
    draft = ()
    if engine.drafter is not None:
        draft = tuple(measure_draft(engine, draft_rows, repeats=repeats, warmup=warmup, context=context, seed=seed))
    return SPSProfile.from_step_times(
        list(times), [statistics.median(v) for v in times.values()], source="measured", draft_points=draft,
        **engine_identity(engine)
    )


def profile_for_engine(engine: VerifierEngine, path: str | Path | None = None, **measure_kw) -> SPSProfile:
    """The engine's SPS profile: read from ``path`` when it exists and was measured for this
    engine's identity, else measured now (and saved to ``path`` when given)."""
    ident = engine_identity(engine)
    if path is not None and Path(path).exists():
        try:
            prof = SPSProfile.load(path)
            if prof.matches(**ident):
                return prof
            log.info("SPS profile %s belongs to another engine (%s); measuring again", path, prof.identity())
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.warning("SPS profile %s is unreadable (%s); measuring again", path, exc)
    prof = measure_sps(engine, **measure_kw)
    if path is not None:
        prof.save(path)
    return prof
