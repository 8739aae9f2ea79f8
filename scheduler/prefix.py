"""Algorithm 1 of the DSpark paper: the hardware-aware prefix scheduler. Pure numpy, no torch.

Per step it chooses verify lengths ℓ_r maximising the expected goodput

    Θ(ℓ) = τ(ℓ) · SPS(B),   τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}),   B = Σ_r (1 + ℓ_r)

where τ counts the expected emitted tokens (accepted drafts plus one bonus/correction per
request) and SPS(B) is the verifier's measured steps per second at B batch tokens
(``dspark.scheduler.sps``). It starts from plain decoding (ℓ = 0: B = R, τ = R) and admits
candidate tokens (r, j) in decreasing order of prefix survival a_{r,j}, stopping at the first
admission that does not raise Θ.
"""

from __future__ import annotations

import numpy as np

from dspark.scheduler.policies import BatchView, Policy, flat_survival, lengths_from_admitted, rank_candidates
from dspark.scheduler.sps import SPSProfile, StepCurve, evaluate_sps

__all__ = ["goodput_curve", "prefix_lengths", "PrefixPolicy"]


def goodput_curve(
    a: np.ndarray,  # [R, γ] prefix survival
    rows: np.ndarray,  # [N] ranked candidates (rank_candidates)
    cols: np.ndarray,  # [N]
    sps: SPSProfile | StepCurve,
) -> np.ndarray:
    """[N+1] Θ_n = τ_n · SPS(R + n) after admitting the first n ranked candidates (n = 0..N).

    Example: one request, a = [[0.8, 0.72]], SPS(1, 2, 3) = (1.0, 0.5, 0.45)
    -> Θ = [1·1.0, 1.8·0.5, 2.52·0.45] = [1.0, 0.9, 1.134].
    """
    R = a.shape[0]
    gains = np.asarray(a, dtype=np.float64)[rows, cols]  # [N]
    tau = R + np.concatenate([[0.0], np.cumsum(gains)])  # [N+1]
    return tau * evaluate_sps(sps, R + np.arange(len(gains) + 1))


def prefix_lengths(
    a: np.ndarray,  # [R, γ] prefix survival, non-increasing along γ
    limits: np.ndarray,  # [R] int: ℓ_r <= limits[r]
    sps: SPSProfile | StepCurve,
    budget: int | None = None,  # max Σ ℓ_r; None = no cap
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
    theta = goodput_curve(a, rows, cols, sps)  # [N+1]
    rises = theta[1:] > theta[:-1]  # [N]: did admitting candidate n raise Θ?
    n = len(rises) if rises.all() else int(np.argmin(rises))  # the first False ends the run
    return lengths_from_admitted(rows[:n], R)


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
    it and checks that the engine's distribution test catches it.

    The break also makes the result a local optimum: on a step-wise SPS curve the run stops at
    the first tile edge even when crossing it would pay (``AsyncPrefixPolicy`` searches globally,
    safely, on stale confidences).

    ``prior`` is the per-token conditional acceptance assumed when the drafter has no confidence
    head (survival prior^j for everyone).
    """

    def __init__(self, sps: SPSProfile | StepCurve, *, prior: float = 0.7):
        if not 0.0 <= prior <= 1.0:
            raise ValueError("prior must be in [0, 1]")
        self.sps = sps
        self.prior = prior

    def choose(self, view: BatchView) -> list[int]:
        if view.num_requests == 0:
            return []
        return prefix_lengths(flat_survival(view, self.prior), view.limits(), self.sps, view.budget_tokens)
