"""Cluster verify budgets: how many draft tokens each verifier replica may verify per step, so
that the cluster's goodput (expected emitted tokens per second, Σ_r τ_r·SPS_r(B_r)) is largest.
Pure Python + numpy (no torch, no Ray); the scheduler actor calls :func:`plan_budgets` with
what the replicas last reported.

The model of one replica (every input comes from its registration and its latest heartbeat):

* R: requests in the batch of the next steps, running + queued (queued requests join at the
  next admission), capped by ``max_batch_size``, and at least 1 (an idle replica is planned for
  its next request).
* b: the budget, draft tokens verified per step summed over the batch (anchors not counted),
  0 <= b <= R·γ. The forward then holds B = R + b tokens.
* T(b): expected tokens emitted per step. With mean conditional acceptance α, a request that
  verifies ℓ drafts emits 1 + α + α² + ... + α^ℓ tokens in expectation (draft j is accepted only
  if drafts 1..j-1 were; the 1 is the target's own token). b is spread evenly over the R
  requests. The local policy spends the budget on its most confident drafts, which this model
  does not see: T is an estimate for choosing b, and the budget is a cap, not an order.
* t(B): seconds per step, read from the replica's profile exactly as ``dspark.scheduler.sps``
  reads one (linear between points; a step-wise curve carries both sides of every jump). The
  plan never goes past the largest profiled B: b <= B_max - R, because nothing is known there.
* d: seconds of one draft pass over the R requests (the registration's ``draft_table``; 0 when
  not measured), paid by every step with b > 0 and skipped at b = 0 (the engine does not draft
  then). So b = 0 wins unless the drafts pay for their own drafting as well.
* load u in [0, 1]: the fraction of wall time the replica's device is busy (NVML utilisation),
  or the fraction its step loop is busy where there is no GPU. A replica busy only u of the
  time spends about (1 - u)/u of a forward's time per step on other things (waiting for drafts,
  host work, waiting for requests): o = t(R)·(1 - u)/u seconds that are paid whatever the
  budget, so verify tokens are relatively cheaper there. u is floored at 0.001.
* G(b) = T(b) / (t(R + b) + d·[b > 0] + o) tokens/s, and the replica's budget is b* = argmax_b G(b).
  At u = 1 this is exactly the paper's objective Θ = τ·SPS(B); as u falls o grows and b* can
  only grow (log G has increasing differences in (b, o) wherever t is non-decreasing in B, so
  the smallest argmax is monotone in o): "verify more when the GPUs are idle, less when busy",
  on top of what the profile's shape already says.

Why this maximises goodput and stays lossless. Σ_r G_r(b_r) is separable, so without a cluster
cap each replica's own argmax is the cluster optimum; the search over b is exhaustive, so a
jagged profile is handled exactly. The budget is computed from heartbeats, before any draft of
the step it applies to is sampled, so a global search is allowed here (the non-anticipation rule
constrains how the local policy fills the budget, not how the budget is chosen). With a cluster
cap on Σ_r b_r (``cluster_cap``: an operator bound on verification work) tokens go where they add
the most goodput per token: a greedy walk over each replica's upper concave hull of G, exact
when every G_r is concave and otherwise an approximation (the leftover tokens are placed by the
curves' actual values; within 2% of brute force on the tests' random cases).

Example: a fully busy replica (u = 1), R = 4, γ = 7, α = 0.8. With a flat profile (same steps/s
for B = 1..64) every extra token is free, so b* = 28 (verify everything). With a profile whose
step time is proportional to B, b* = 0: a draft token costs as much as an anchor, whose token is
certain, and yields α^j < 1. At u = 0.5 the same proportional profile gives b* = 8 (the step's
overhead o is paid anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dspark.scheduler.sps import SPSProfile

MIN_LOAD = 1e-3  # load floor: keeps the overhead term finite for a replica reporting 0

__all__ = [
    "MIN_LOAD", "ReplicaDemand", "ReplicaPlan", "ReplicaCurve",
    "step_time", "expected_tokens", "goodput_curve", "allocate", "plan_budgets",
]


@dataclass(frozen=True)
class ReplicaDemand:
    """One replica's inputs to the plan (see the module docstring for the model)."""

    replica_id: str
    sps_table: Sequence[tuple[int, float]]  # (B tokens, steps/s), B strictly increasing
    gamma: int
    max_batch_size: int
    running: int
    queue_depth: int
    load: float  # [0, 1]
    accept_rate: float  # α in [0, 1]
    draft_table: Sequence[tuple[int, float]] = ()  # (R, seconds per draft pass); () = drafting is free

    @property
    def requests(self) -> int:
        """R: the batch the budget is planned for."""
        return max(1, min(self.max_batch_size, self.running + self.queue_depth))


@dataclass(frozen=True)
class ReplicaPlan:
    replica_id: str
    budget_tokens: int  # b: draft tokens per step across the batch
    requests: int  # R the budget was planned for
    goodput: float  # G(b), expected tokens/s
    goodput_plain: float  # G(0): plain decoding, for reference


def step_time(sps_table: Sequence[tuple[int, float]], batch_tokens: np.ndarray) -> np.ndarray:
    """Seconds per verify step at each B of ``batch_tokens``, read as :class:`SPSProfile` reads
    a profile. Example: table [(8, 100.0), (64, 50.0)] -> B = 8: 0.01 s, B = 64: 0.02 s."""
    return np.asarray(SPSProfile.from_points(sps_table).step_time_s(np.asarray(batch_tokens)), dtype=np.float64)


def expected_tokens(accept_rate: float, requests: int, gamma: int, budgets: np.ndarray) -> np.ndarray:
    """T(b): expected tokens emitted per step when b draft tokens are spread evenly over R requests
    (each verifies ⌊b/R⌋ or ⌈b/R⌉, at most γ) and each draft survives with probability α given
    its predecessors did.

    Example: α = 0.5, R = 2, b = 3 -> one request verifies 2 (1 + .5 + .25), the other 1 (1 + .5):
    T = 3.25.
    """
    a = float(accept_rate)
    b = np.minimum(np.asarray(budgets, dtype=np.int64), requests * gamma)
    # S[ℓ] = α + α² + ... + α^ℓ: expected accepted drafts of a request verifying ℓ
    S = np.concatenate([[0.0], np.cumsum(a ** np.arange(1, gamma + 1, dtype=np.float64))])  # [γ+1]
    q, rem = np.divmod(b, requests)
    return requests + (requests - rem) * S[q] + rem * S[np.minimum(q + 1, gamma)]


def goodput_curve(d: ReplicaDemand) -> np.ndarray:
    """G(b) in tokens/s for b = 0..min(R·γ, B_max - R): expected tokens per step over the step's
    wall time."""
    R, gamma = d.requests, max(d.gamma, 0)
    largest = max(int(p[0]) for p in d.sps_table)
    b = np.arange(0, max(0, min(R * gamma, largest - R)) + 1, dtype=np.int64)  # [b_max + 1]
    t = step_time(d.sps_table, R + b)  # [R·γ + 1] profiled forward times
    if len(d.draft_table):  # b > 0 needs a draft pass first; b = 0 skips it
        t[1:] += SPSProfile.from_points(d.sps_table, draft_points=tuple(d.draft_table)).draft_time_s(R)
    u = float(np.clip(d.load, MIN_LOAD, 1.0))
    overhead = t[0] * (1.0 - u) / u  # o: per-step seconds outside the forward, budget-independent
    return expected_tokens(d.accept_rate, R, gamma, b) / (t + overhead)


def _upper_hull(g: np.ndarray) -> tuple[int, ...]:
    """Indices of the upper concave hull of the points (b, g[b]) from b = 0 to argmax g."""
    hull: list[int] = []
    for x in range(int(np.argmax(g)) + 1):
        while len(hull) >= 2:
            x1, x2 = hull[-2], hull[-1]
            # drop x2 if it lies on or below the chord x1 -> x
            if (g[x2] - g[x1]) * (x - x1) <= (g[x] - g[x1]) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(x)
    return tuple(hull)


@dataclass(frozen=True, eq=False)
class ReplicaCurve:
    """One replica's G(b) and its upper concave hull: computed once per heartbeat, so that a
    cluster cap can be re-allocated over all replicas without recomputing every curve."""

    replica_id: str
    requests: int
    goodput: np.ndarray  # [b_max + 1] G(b) in tokens/s
    hull: tuple[int, ...]  # budgets on the upper concave hull of G, from 0 to the first argmax

    @classmethod
    def of(cls, d: ReplicaDemand) -> "ReplicaCurve":
        g = goodput_curve(d)
        return cls(d.replica_id, d.requests, g, _upper_hull(g))


def allocate(curves: Sequence[ReplicaCurve], *, cluster_cap: int | None = None) -> dict[str, ReplicaPlan]:
    """Each replica's budget: its own argmax of G (the first one: fewest tokens on ties), or,
    when their sum exceeds ``cluster_cap``, the greedy hull allocation of the module docstring
    (Σ budgets <= cluster_cap)."""
    budgets = {c.replica_id: c.hull[-1] for c in curves}
    if cluster_cap is not None and sum(budgets.values()) > cluster_cap:
        budgets = _capped(curves, int(cluster_cap))
    return {
        c.replica_id: ReplicaPlan(c.replica_id, budgets[c.replica_id], c.requests,
                                  float(c.goodput[budgets[c.replica_id]]), float(c.goodput[0]))
        for c in curves
    }


def plan_budgets(demands: Sequence[ReplicaDemand], *, cluster_cap: int | None = None) -> dict[str, ReplicaPlan]:
    """Budgets for every replica from its demand: :meth:`ReplicaCurve.of` then :func:`allocate`."""
    return allocate([ReplicaCurve.of(d) for d in demands], cluster_cap=cluster_cap)


def _capped(curves: Sequence[ReplicaCurve], cap: int) -> dict[str, int]:
    # hull segments (gain per token, replica, from b, to b); within a replica the slopes fall, so
    # sorting all segments by slope keeps each replica's segments in order
    goodput = {c.replica_id: c.goodput for c in curves}
    segments = []
    for c in curves:
        g, h = c.goodput, c.hull
        segments += [((g[x2] - g[x1]) / (x2 - x1), c.replica_id, x1, x2) for x1, x2 in zip(h, h[1:])]
    segments.sort(key=lambda s: -s[0])
    budgets = {c.replica_id: 0 for c in curves}
    blocked: set[str] = set()  # replicas whose next segment did not fit: their later ones cannot follow
    left = cap
    for _, rid, x1, x2 in segments:
        if rid in blocked:
            continue
        if x2 - x1 <= left:
            budgets[rid], left = x2, left - (x2 - x1)
        else:
            blocked.add(rid)
    # spend what is left inside the blocked segments, best actual gain first
    while left > 0 and blocked:
        best = None
        for rid in sorted(blocked):  # sorted: the same answer whatever the set's order
            g, b0 = goodput[rid], budgets[rid]
            hi = min(len(g) - 1, b0 + left)
            if hi > b0:
                x = b0 + 1 + int(np.argmax(g[b0 + 1 : hi + 1]))
                if g[x] > g[b0] and (best is None or g[x] - g[b0] > best[0]):
                    best = (g[x] - g[b0], rid, x)
        if best is None:
            break
        _, rid, x = best
        left -= x - budgets[rid]
        budgets[rid] = x
        blocked.discard(rid)
    return budgets
