"""The production variant of the prefix scheduler (DSpark paper §5.2): the *capacity* K of a
step (how many draft tokens the batch verifies) is decided from confidences ``lag`` steps old
(2 in production), by a global search over the whole SPS curve; the current step's survivals
only pick *which* K candidates fill it (dynamic top-K). Pure numpy, no torch.

Draft cost: the capacity search prices the step's (sunk) draft pass, and before drafting the
policy skips the pass when even the best drafting step, sized from the latest recorded survivals,
would not beat plain decoding (``dspark.scheduler.prefix.PlanGate``).

Why two steps: with zero-overhead scheduling the host plans step t while step t−1 still runs on
the device, so t−1's confidences are not available yet; and a batch size known one step ahead
lets the engine replay a captured graph for it. For losslessness any lag >= 1 would do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dspark.scheduler.history import SurvivalHistory, stale_survival
from dspark.scheduler.policies import BatchView, Policy, flat_survival, lengths_from_admitted, rank_candidates
from dspark.scheduler.prefix import PlanGate, drafting_requests, goodput_curve, prefix_lengths
from dspark.scheduler.sps import SPSProfile, StepCurve, draft_seconds

__all__ = ["global_capacity", "top_k_lengths", "stale_survival", "AsyncPrefixPolicy"]


def global_capacity(
    a: np.ndarray,  # [R, γ] prefix survival used to *size* the step
    limits: np.ndarray,  # [R] int
    sps: SPSProfile | StepCurve,
    budget: int | None = None,
    draft_s: float = 0.0,  # seconds of the step's draft pass (sunk)
) -> int:
    """K = argmax_n Θ_n over every leading part of the ranking (no early break; the first of
    equal maxima). On a step-wise curve this crosses tile edges when the tokens behind the edge
    pay for it, where Algorithm 1 stops at the edge.

    NOT lossless when ``a`` is the current step's survival (see ``AsyncPrefixPolicy``); it is
    meant for stale survivals.
    Example: a = [[0.8, 0.72]], SPS(1, 2, 3) = (1.0, 0.5, 0.45): Θ = [1.0, 0.9, 1.134] -> K = 2.
    """
    rows, cols = rank_candidates(a, np.asarray(limits, dtype=np.int64))
    if budget is not None:
        rows, cols = rows[:budget], cols[:budget]
    if len(rows) == 0:
        return 0
    return int(np.argmax(goodput_curve(a, rows, cols, sps, draft_s)))


def top_k_lengths(a: np.ndarray, limits: np.ndarray, k: int) -> list[int]:
    """Admit the first ``k`` candidates of the ranking by ``a`` [R, γ] -> ℓ_r per request.
    Example: a = [[.9, .5], [.8, .7]], k = 3 -> [1, 2]."""
    rows, _ = rank_candidates(a, np.asarray(limits, dtype=np.int64))
    return lengths_from_admitted(rows[: max(0, int(k))], a.shape[0])


class AsyncPrefixPolicy(Policy):
    """Capacity from stale confidences, admission by current survival (the "async" policy).

    At a drafting step t: K_t = :func:`global_capacity` on the survivals recorded ``lag`` drafting
    steps earlier, for the current requests (budget, current per-request limits and the sunk draft
    cost applied); then the top K_t candidates by *current* survival are verified
    (:func:`top_k_lengths`). Until ``lag`` steps have been recorded (start-up) Algorithm 1 decides
    instead (``PrefixPolicy``, also lossless). Per-request state is the last ``lag`` steps' survival
    rows keyed by request id, so requests joining and leaving need no bookkeeping. Before drafting,
    ``plan`` skips the draft pass when it would not pay (:class:`~dspark.scheduler.prefix.PlanGate`).

    **Why it is lossless.** K_t is a function of the history only: survivals of drafts from an
    earlier step (all verified and committed before step t's drafts were sampled), the set of
    running requests, their limits, the budget and the cost curves. Given K_t, candidate (r, k) is
    admitted iff fewer than K_t candidates rank before it, and every candidate that can rank before
    it is independent of the sampled d_{r,k} (the ranking argument of ``dspark.scheduler.policies``):
    the candidates of request r that depend on d_{r,k} are (r, j > k), which rank after it. So
    the decision to verify d_{r,k} uses d_{r,<k}, other requests and the history, never d_{r,k}.
    That is why the global search (no early break) is allowed here: it runs on stale numbers,
    behind a causal barrier. Run on the *current* survivals it would be Appendix A's unsafe
    search (the tests show its bias); hence ``lag >= 1``.
    """

    def __init__(self, sps: SPSProfile | StepCurve, *, lag: int = 2, prior: float = 0.7, refresh: int = 64):
        if lag < 1:
            raise ValueError("lag must be >= 1 (capacity from the current step's confidences is not lossless)")
        if not 0.0 <= prior <= 1.0:
            raise ValueError("prior must be in [0, 1]")
        self.sps = sps
        self.lag = lag
        self.prior = prior
        self.history = SurvivalHistory(lag)
        self.gate = PlanGate(sps, self.history, refresh)
        self.last_capacity: int | None = None  # K of the last step; None = Algorithm 1 decided
        self.cold_steps = 0  # steps decided by Algorithm 1 for lack of history

    def plan(self, view: BatchView) -> bool:
        return self.gate(view)

    def choose(self, view: BatchView) -> list[int]:
        a = flat_survival(view, self.prior)  # [R, γ] current survival
        limits = view.limits()  # [R]
        d = draft_seconds(self.sps, drafting_requests(limits))
        old = self.history.lookup(view.request_ids, self.lag, view.gamma)
        if old is None:
            lengths = prefix_lengths(a, limits, self.sps, view.budget_tokens, d)
            self.last_capacity = None
            self.cold_steps += 1
        else:
            self.last_capacity = global_capacity(old, limits, self.sps, view.budget_tokens, d)
            lengths = top_k_lengths(a, limits, self.last_capacity)
        self.history.record(view.request_ids, a, limits)
        self.gate.drafted()
        return lengths
