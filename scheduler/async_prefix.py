"""The production variant of the prefix scheduler (DSpark paper §5.2): the *capacity* K of a
step (how many draft tokens the batch verifies) is decided from confidences ``lag`` steps old
(2 in production), by a global search over the whole SPS curve; the current step's survivals
only pick *which* K candidates fill it (dynamic top-K). Pure numpy, no torch.

Why two steps: with zero-overhead scheduling the host plans step t while step t−1 still runs on
the device, so t−1's confidences are not available yet; and a batch size known one step ahead
lets the engine replay a captured graph for it. For losslessness any lag >= 1 would do.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from dspark.scheduler.policies import BatchView, Policy, flat_survival, lengths_from_admitted, rank_candidates
from dspark.scheduler.prefix import goodput_curve, prefix_lengths
from dspark.scheduler.sps import SPSProfile, StepCurve

__all__ = ["global_capacity", "top_k_lengths", "stale_survival", "AsyncPrefixPolicy"]


def global_capacity(
    a: np.ndarray,  # [R, γ] prefix survival used to *size* the step
    limits: np.ndarray,  # [R] int
    sps: SPSProfile | StepCurve,
    budget: int | None = None,
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
    return int(np.argmax(goodput_curve(a, rows, cols, sps)))


def top_k_lengths(a: np.ndarray, limits: np.ndarray, k: int) -> list[int]:
    """Admit the first ``k`` candidates of the ranking by ``a`` [R, γ] -> ℓ_r per request.
    Example: a = [[.9, .5], [.8, .7]], k = 3 -> [1, 2]."""
    rows, _ = rank_candidates(a, np.asarray(limits, dtype=np.int64))
    return lengths_from_admitted(rows[: max(0, int(k))], a.shape[0])


def stale_survival(
    request_ids: Sequence[str],  # [R] the current requests
    index: Mapping[str, int],  # request id -> row of ``rows``
    rows: np.ndarray,  # [M, γ] survivals recorded ``lag`` steps ago
) -> np.ndarray | None:
    """[R, γ] survivals recorded ``lag`` steps ago for the current requests.

    A request that was not running then (or not drafting) gets the mean of the recorded rows:
    still information from before this step. None when nothing was recorded.
    Example: ids (a, c), index {a: 0, b: 1}, rows [[.9, .81], [.2, .04]] -> [[.9, .81], [.55, .425]].
    """
    if len(rows) == 0:
        return None
    M = len(rows)
    table = np.concatenate([rows, rows.mean(axis=0, keepdims=True)])  # [M+1, γ]: the mean last
    pick = np.fromiter((index.get(rid, M) for rid in request_ids), dtype=np.int64, count=len(request_ids))
    return table[pick]


class AsyncPrefixPolicy(Policy):
    """Capacity from stale confidences, admission by current survival (the "async" policy).

    At step t: K_t = :func:`global_capacity` on the survivals recorded at step t − ``lag`` for
    the current requests (budget and current per-request limits applied); then the top K_t
    candidates by *current* survival are verified (:func:`top_k_lengths`). Until ``lag`` steps
    have been recorded (start-up) Algorithm 1 decides instead (``PrefixPolicy``, also lossless).
    Per-request state is the last ``lag`` steps' survival rows keyed by request id, so requests
    joining and leaving need no bookkeeping: rows older than ``lag`` steps are dropped.

    **Why it is lossless.** K_t is a function of the history only: survivals of drafts from step
    t − lag (all verified and committed before step t's drafts were sampled), the set of running
    requests, their limits, the budget and the SPS curve. Given K_t, candidate (r, k) is admitted
    iff fewer than K_t candidates rank before it, and every candidate that can rank before it is
    independent of the sampled d_{r,k} (the ranking argument of ``dspark.scheduler.policies``):
    the candidates of request r that depend on d_{r,k} are (r, j > k), which rank after it. So
    the decision to verify d_{r,k} uses d_{r,<k}, other requests and the history, never d_{r,k}.
    That is why the global search (no early break) is allowed here: it runs on stale numbers,
    behind a causal barrier. Run on the *current* survivals it would be Appendix A's unsafe
    search (the tests show its bias); hence ``lag >= 1``.
    """

    def __init__(self, sps: SPSProfile | StepCurve, *, lag: int = 2, prior: float = 0.7):
        if lag < 1:
            raise ValueError("lag must be >= 1 (capacity from the current step's confidences is not lossless)")
        if not 0.0 <= prior <= 1.0:
            raise ValueError("prior must be in [0, 1]")
        self.sps = sps
        self.lag = lag
        self.prior = prior
        self._step = 0
        # step -> (request id -> row, survivals [M, γ]) of the rows that could verify
        self._history: dict[int, tuple[dict[str, int], np.ndarray]] = {}
        self.last_capacity: int | None = None  # K of the last step; None = Algorithm 1 decided
        self.cold_steps = 0  # steps decided by Algorithm 1 for lack of history

    def choose(self, view: BatchView) -> list[int]:
        t, self._step = self._step, self._step + 1
        a = flat_survival(view, self.prior)  # [R, γ] current survival
        limits = view.limits()  # [R]
        index, rows = self._history.get(t - self.lag, ({}, np.zeros((0, view.gamma))))
        old = stale_survival(view.request_ids, index, rows)
        if old is None or old.shape[1] != view.gamma:
            lengths = prefix_lengths(a, limits, self.sps, view.budget_tokens)
            self.last_capacity = None
            self.cold_steps += 1
        else:
            self.last_capacity = global_capacity(old, limits, self.sps, view.budget_tokens)
            lengths = top_k_lengths(a, limits, self.last_capacity)
        # remember this step's survivals (rows that could verify: the others carry no drafts)
        keep = np.flatnonzero(limits > 0)  # [M]
        self._history[t] = ({view.request_ids[i]: j for j, i in enumerate(keep.tolist())}, a[keep])
        for s in [s for s in self._history if s <= t - self.lag]:
            del self._history[s]
        return lengths
