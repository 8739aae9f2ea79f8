"""Algorithm 1 of the DSpark paper: the hardware-aware prefix scheduler. Pure numpy, no torch.

Per step it chooses verify lengths ℓ_r maximising the expected goodput

    Θ(ℓ) = τ(ℓ) / (d + 1 / SPS(B)),   τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}),   B = Σ_r (1 + ℓ_r)

where τ counts the expected emitted tokens (accepted drafts plus one bonus/correction per
request), SPS(B) is the verifier's measured steps per second at B batch tokens and d the seconds
of the step's draft pass (``dspark.scheduler.sps``; d = 0 gives the paper's Θ = τ·SPS(B)). It
starts from ℓ = 0 (B = R, τ = R) and admits candidate tokens (r, j) in decreasing order of prefix
survival a_{r,j}, stopping at the first admission that does not raise Θ.

The draft pass is decided before it runs (``plan``): once drafted, d is sunk and only the verify
lengths remain to choose, so a drafting step's Θ carries d in every term (verifying more is then
relatively cheaper); whether to draft at all compares the best drafting step, estimated from the
last recorded survivals, with plain decoding's R·SPS(R), which pays no d
(:func:`draft_capacity`). That comparison is a global search, allowed because it runs on history.
"""

from __future__ import annotations

import numpy as np

from dspark.scheduler.history import SurvivalHistory
from dspark.scheduler.policies import BatchView, Policy, flat_survival, lengths_from_admitted, rank_candidates
from dspark.scheduler.sps import SPSProfile, StepCurve, draft_seconds, evaluate_sps

__all__ = ["goodput_curve", "prefix_lengths", "draft_capacity", "drafting_requests", "PlanGate", "PrefixPolicy"]


def drafting_requests(limits: np.ndarray) -> int:
    """R_d: the requests a draft pass drafts for (those allowed to verify at least one token)."""
    return int((np.asarray(limits) > 0).sum())


def goodput_curve(
    a: np.ndarray,  # [R, γ] prefix survival
    rows: np.ndarray,  # [N] ranked candidates (rank_candidates)
    cols: np.ndarray,  # [N]
    sps: SPSProfile | StepCurve,
    draft_s: float = 0.0,  # seconds of the step's draft pass (sunk: in every term)
) -> np.ndarray:
    """[N+1] Θ_n = τ_n / (d + 1/SPS(R + n)) after admitting the first n ranked candidates.

    Example: one request, a = [[0.8, 0.72]], SPS(1, 2, 3) = (1.0, 0.5, 0.45), d = 0
    -> Θ = [1·1.0, 1.8·0.5, 2.52·0.45] = [1.0, 0.9, 1.134].
    """
    R = a.shape[0]
    gains = np.asarray(a, dtype=np.float64)[rows, cols]  # [N]
    tau = R + np.concatenate([[0.0], np.cumsum(gains)])  # [N+1]
    rate = evaluate_sps(sps, R + np.arange(len(gains) + 1))  # [N+1] verify forwards per second
    return tau * rate if draft_s == 0 else tau / (draft_s + 1.0 / rate)


def prefix_lengths(
    a: np.ndarray,  # [R, γ] prefix survival, non-increasing along γ
    limits: np.ndarray,  # [R] int: ℓ_r <= limits[r]
    sps: SPSProfile | StepCurve,
    budget: int | None = None,  # max Σ ℓ_r; None = no cap
    draft_s: float = 0.0,
) -> list[int]:
    """Algorithm 1 (greedy with the early break) -> ℓ_r per request.

    Candidates are admitted in the order of :func:`rank_candidates`; the run stops at the first
    candidate whose admission does not raise Θ strictly (or when the budget is used up). So the
    admitted set is the longest leading run of the ranking along which Θ keeps rising.

    Example (the Appendix A setup): a = [[0.8, 0.72]], SPS(1, 2, 3) = (1.0, 0.5, 0.45):
    Θ = 1.0, then 0.9 for d_1: break -> ℓ = [0], although verifying both (Θ = 1.134) would score
    higher. That is the price of losslessness (see ``PrefixPolicy``).
    """
    R = a.shape[0]
    rows, cols = rank_candidates(a, np.asarray(limits, dtype=np.int64))
    if budget is not None:
        rows, cols = rows[:budget], cols[:budget]
    if len(rows) == 0:
        return [0] * R
    theta = goodput_curve(a, rows, cols, sps, draft_s)  # [N+1]
    rises = theta[1:] > theta[:-1]  # [N]: did admitting candidate n raise Θ?
    n = len(rises) if rises.all() else int(np.argmin(rises))  # the first False ends the run
    return lengths_from_admitted(rows[:n], R)


def draft_capacity(
    a: np.ndarray,  # [R, γ] *estimated* survival (history), never the current step's
    limits: np.ndarray,  # [R] int
    sps: SPSProfile | StepCurve,
    budget: int | None = None,
) -> int:
    """Before drafting: the draft tokens K >= 1 of the best drafting step, max_n τ_n / (d + 1/SPS(R + n)),
    if it beats plain decoding's R·SPS(R); else 0 (skip the draft pass). d = the draft pass over the
    requests that may verify.

    Example: a = [[0.9, 0.81]], SPS flat at 100/s: plain 100 tokens/s; with d = 0 drafting both
    gives 2.71·100 -> K = 2; with d = 20 ms, 2.71 / 0.03 = 90 tokens/s < 100 -> 0.
    """
    R = a.shape[0]
    rows, cols = rank_candidates(a, np.asarray(limits, dtype=np.int64))
    if budget is not None:
        rows, cols = rows[:budget], cols[:budget]
    if R == 0 or len(rows) == 0:
        return 0
    plain = R * float(evaluate_sps(sps, np.array([R]))[0])
    theta = goodput_curve(a, rows, cols, sps, draft_seconds(sps, drafting_requests(limits)))  # [N+1]
    k = 1 + int(np.argmax(theta[1:]))
    return k if theta[k] > plain else 0


class PlanGate:
    """The pre-draft decision shared by the scheduled policies: draft when :func:`draft_capacity`
    on the latest recorded survivals is positive. With nothing recorded yet (start-up) it drafts,
    to learn; after ``refresh`` skipped steps in a row it drafts once, so the survivals it decides
    from do not go stale while the load changes (0 = never). History only: lossless."""

    def __init__(self, sps: SPSProfile | StepCurve, history: SurvivalHistory, refresh: int = 64):
        if refresh < 0:
            raise ValueError("refresh must be >= 0")
        self.sps, self.history, self.refresh = sps, history, refresh
        self.skipped = 0  # draft passes skipped in a row
        self.total_skipped = 0

    def __call__(self, view: BatchView) -> bool:
        old = self.history.lookup(view.request_ids, 1, view.gamma)
        if old is None or (self.refresh and self.skipped >= self.refresh):
            return True
        if draft_capacity(old, view.limits(), self.sps, view.budget_tokens) > 0:
            return True
        self.skipped += 1
        self.total_skipped += 1
        return False

    def drafted(self) -> None:
        self.skipped = 0


class PrefixPolicy(Policy):
    """DSpark's hardware-aware prefix scheduler (paper Algorithm 1), with the early break.

    **Why it is lossless.** Whether candidate (r, k) is admitted depends only on the candidates
    ranked at or before it: their survivals (the Θ values along the run) and their count (the
    budget). A candidate that depends on the sampled d_{r,k} is some (r, j > k), whose
    survival a_{r,j} = a_{r,k} · c_{r,k+1} ⋯ involves c_{r,k+1}, a function of d_{r,k}; it ranks
    *after* (r, k) (a is non-increasing in j, ties to the smaller j). So the decision to verify
    d_{r,k} is made from d_{r,<k}, other requests' drafts and the history only, and rejection
    sampling stays exact. The early break is what guarantees this: a search over *all* stopping
    points (take the n with the highest Θ_n) would let later candidates such as (r, k+1) decide
    whether (r, k) is verified, so d_{r,k}'s own value would influence its verification. The
    paper's Appendix A shows that turns a target (0.7, 0.3) into (0.85, 0.15); a test reproduces
    it and checks that the engine's distribution test catches it. The draft cost d in Θ is a
    constant of the step and the pre-draft ``plan`` reads only recorded survivals: neither
    changes the argument.

    The break also makes the result a local optimum: on a step-wise SPS curve the run stops at
    the first tile edge even when crossing it would pay (``AsyncPrefixPolicy`` searches globally,
    safely, on stale confidences).

    ``prior`` is the per-token conditional acceptance assumed when the drafter has no confidence
    head (survival prior^j for everyone); ``refresh`` see :class:`PlanGate`.
    """

    def __init__(self, sps: SPSProfile | StepCurve, *, prior: float = 0.7, refresh: int = 64):
        if not 0.0 <= prior <= 1.0:
            raise ValueError("prior must be in [0, 1]")
        self.sps = sps
        self.prior = prior
        self.gate = PlanGate(sps, SurvivalHistory(1), refresh)

    def plan(self, view: BatchView) -> bool:
        return self.gate(view)

    def choose(self, view: BatchView) -> list[int]:
        if view.num_requests == 0:
            return []
        a, limits = flat_survival(view, self.prior), view.limits()
        self.gate.history.record(view.request_ids, a, limits)
        self.gate.drafted()
        d = draft_seconds(self.sps, drafting_requests(limits))
        return prefix_lengths(a, limits, self.sps, view.budget_tokens, d)
