"""Verify-length policies: given one step's drafts and their confidences, how many of each
request's γ drafted tokens the target verifies. Pure Python/numpy, no torch.

Notation (DSpark paper §3.2.2). Request r drafted d_{r,1..γ}; the confidence head gives the
calibrated conditional c_{r,k} = P(d_{r,k} accepted | d_{r,<k} accepted). c_{r,k} is computed
from the hidden state of slot k and the *previous* draft token, so it is a function of
d_{r,<k}, never of d_{r,k} itself. Prefix survival a_{r,j} = Π_{i≤j} c_{r,i} is the probability
that the first j drafts are all accepted; it is non-increasing in j.

**The losslessness rule (non-anticipation).** Rejection sampling at position k emits a token
distributed exactly as the target whenever the decision to verify d_{r,k} is a function of what
was known before d_{r,k} was sampled: the committed history, d_{r,<k} (hence c_{r,≤k} and
a_{r,≤k}), other requests' drafts (sampled from their own generators), and the cluster budget.
Given that information d_{r,k} is still a fresh draw from the draft distribution, so
accept-or-resample yields the target's token; and when d_{r,k} is not verified the target samples
position k itself. A rule that lets d_{r,k} (through c_{r,k+1}, a_{r,k+1}, ...) influence whether
d_{r,k} is verified is biased: see Appendix A and ``async_prefix.py``.

Every candidate token (r, j) is ranked by the key (−a_{r,j}, j, r). Because a is non-increasing
in j and ties go to the smaller j, a request's j comes after its j−1, and *no candidate that
depends on d_{r,k} (that is, (r, j) for j > k) ranks before (r, k)*. Every rule here admits
(r, k) as a function of the candidates ranked at or before it, which is what makes them lossless;
the same holds for cutting any of them to a budget along that ranking (:func:`trim_to_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

__all__ = [
    "BatchView",
    "VerifyPolicy",
    "LegacyPolicy",
    "Policy",
    "OffPolicy",
    "FixedPolicy",
    "ThresholdPolicy",
    "survival",
    "flat_survival",
    "rank_candidates",
    "lengths_from_admitted",
    "trim_to_budget",
    "decide_lengths",
    "should_draft",
    "clip_lengths",
]


@dataclass(frozen=True, eq=False)
class BatchView:
    """What a policy sees at one verify step; everything here is known before the target's verdict.

    ``budget_tokens`` caps the *draft* tokens verified this step, Σ_r ℓ_r (the R anchors are
    always verified); the cluster scheduler sets it; None = no cap, 0 = plain decoding.
    ``max_lengths`` are per-request caps known from the history (``max_tokens`` left, a request
    whose drafter lost its context); None = γ for everyone.
    """

    confidences: np.ndarray | None  # [R, γ] float in [0, 1]: c_{r,k}; None = the drafter has no head
    gamma: int
    request_ids: tuple[str, ...]  # [R] stable while the request runs; requests come and go
    budget_tokens: int | None = None
    max_lengths: tuple[int, ...] | None = None  # [R]

    def __post_init__(self):
        R = len(self.request_ids)
        if self.gamma < 0:
            raise ValueError("gamma must be >= 0")
        if self.confidences is not None and np.shape(self.confidences) != (R, self.gamma):
            raise ValueError(f"confidences {np.shape(self.confidences)} != (R={R}, γ={self.gamma})")
        if self.max_lengths is not None and len(self.max_lengths) != R:
            raise ValueError(f"max_lengths has {len(self.max_lengths)} entries for {R} requests")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ValueError("budget_tokens must be >= 0")

    @classmethod
    def of(cls, confidences: np.ndarray | None, gamma: int, num_requests: int, **kw) -> "BatchView":
        """A view for callers that have no request ids (ids are the row numbers)."""
        return cls(confidences, gamma, tuple(str(i) for i in range(num_requests)), **kw)

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def limits(self) -> np.ndarray:
        """[R] int: the most each request may verify, min(γ, max_lengths[r]) and >= 0."""
        lim = np.full(self.num_requests, self.gamma, dtype=np.int64)
        if self.max_lengths is not None:
            lim = np.clip(np.asarray(self.max_lengths, dtype=np.int64), 0, self.gamma)
        return lim


class VerifyPolicy(Protocol):
    def choose(self, view: BatchView) -> list[int]:
        """ℓ_r per request, 0 <= ℓ_r <= view.limits()[r], Σ ℓ_r <= view.budget_tokens."""
        ...


# The first interface, still accepted by the engine: ``policy(confidences, gamma, num_requests)``.
LegacyPolicy = Callable[[np.ndarray | None, int, int], Sequence[int]]


class Policy:
    """Base of the policies here: ``choose(view)``, plus the old call form for existing callers.

    ``plan(view)`` is asked *before* the step's draft pass, with a view without confidences:
    False skips drafting for the step (every ℓ = 0, no draft cost). It may use only what is known
    before the step's drafts exist, so it is lossless whatever it decides. Default: always draft.
    """

    def choose(self, view: BatchView) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, view: BatchView) -> bool:
        return True

    def __call__(self, confidences: np.ndarray | None, gamma: int, num_requests: int) -> list[int]:
        return self.choose(BatchView.of(confidences, gamma, num_requests))


# ---------------------------------------------------------------------------------------------
# Pure functions shared by every policy
# ---------------------------------------------------------------------------------------------


def survival(confidences: np.ndarray) -> np.ndarray:
    """[R, γ] conditionals c -> [R, γ] prefix survival a_{r,j} = Π_{i≤j} c_{r,i}.

    c is clipped to [0, 1] (NaN -> 0), so a is exactly non-increasing along j in floating point
    (x·c rounds to at most x when c <= 1). Example: c = [[0.9, 0.5, 1.0]] -> [[0.9, 0.45, 0.45]].
    """
    c = np.nan_to_num(np.asarray(confidences, dtype=np.float64), nan=0.0)  # [R, γ]
    assert c.ndim == 2, c.shape
    return np.cumprod(np.clip(c, 0.0, 1.0), axis=1)


def rank_candidates(a: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate tokens (r, j) with j < limits[r], best first by the key (−a_{r,j}, j, r).

    Returns (rows [N], cols [N]) with cols 0-based (col j is draft d_{j+1}). The order is
    prefix-closed: any leading part of it admits, per request, a prefix of its block.
    """
    a = np.asarray(a, dtype=np.float64)  # [R, γ]
    assert a.ndim == 2 and limits.shape == (a.shape[0],), (a.shape, limits.shape)
    R, G = a.shape
    rows, cols = np.nonzero(np.arange(G)[None, :] < limits[:, None])  # [N] each
    order = np.lexsort((rows, cols, -a[rows, cols]))  # last key is the primary one
    return rows[order], cols[order]


def lengths_from_admitted(rows: np.ndarray, num_requests: int) -> list[int]:
    """Admitted candidates (a leading part of :func:`rank_candidates`) -> ℓ_r per request."""
    return np.bincount(rows, minlength=num_requests).tolist()


def flat_survival(view: BatchView, prior: float = 1.0) -> np.ndarray:
    """[R, γ] survival from the view's confidences, or prior^j for everyone without a head."""
    if view.confidences is not None:
        return survival(view.confidences)
    return np.tile(prior ** np.arange(1, view.gamma + 1, dtype=np.float64), (view.num_requests, 1))


def trim_to_budget(lengths: Sequence[int], a: np.ndarray | None, budget: int | None) -> list[int]:
    """Keep at most ``budget`` of the chosen draft tokens, the best by the key (−a, j, r).

    Lossless for any lossless ``lengths``: whether (r, k) survives the cut depends only on the
    chosen candidates ranked before it, none of which depends on d_{r,k}. Without confidences
    (a None) the cut is breadth-first: every request's first draft, then every second, ...
    Example: lengths [3, 1], a [[.9, .8, .1], [.95, ...]], budget 2 -> [1, 1].
    """
    ell = np.maximum(np.asarray(lengths, dtype=np.int64).reshape(-1), 0)  # [R]
    if budget is None or int(ell.sum()) <= budget:
        return ell.tolist()
    R, G = len(ell), int(ell.max())
    if a is None:
        a = np.ones((R, G))
    rows, _ = rank_candidates(np.asarray(a, dtype=np.float64)[:, :G], ell)
    return lengths_from_admitted(rows[:budget], R)


def decide_lengths(policy: VerifyPolicy | LegacyPolicy, view: BatchView) -> list[int]:
    """The engine's entry point: ask ``policy`` (new or old interface), then enforce the view's
    per-request limits and budget whatever the policy returned (both cuts are lossless)."""
    if hasattr(policy, "choose"):
        lengths = list(policy.choose(view))
    else:
        lengths = list(policy(view.confidences, view.gamma, view.num_requests))
    if len(lengths) != view.num_requests:
        raise ValueError(f"policy returned {len(lengths)} lengths for {view.num_requests} requests")
    lengths = np.clip(np.asarray(lengths, dtype=np.int64), 0, view.limits())  # [R]
    if view.budget_tokens is None or int(lengths.sum()) <= view.budget_tokens:
        return lengths.tolist()
    a = survival(view.confidences) if view.confidences is not None else None
    return trim_to_budget(lengths, a, view.budget_tokens)


def should_draft(policy: VerifyPolicy | LegacyPolicy, view: BatchView) -> bool:
    """The engine's pre-draft question: does this step draft at all? ``view`` has no confidences
    (nothing is drafted yet). Policies without ``plan`` (the old interface) always draft; a view
    whose budget or limits allow no draft token never does."""
    if view.budget_tokens == 0 or view.num_requests == 0 or not view.limits().any():
        return False
    plan = getattr(policy, "plan", None)
    return bool(plan(view)) if plan is not None else True


def clip_lengths(lengths: Sequence[int], limits: Sequence[int]) -> list[int]:
    """Element-wise min(ℓ_r, limit_r), never below 0."""
    return [max(0, min(int(a), int(b))) for a, b in zip(lengths, limits)]


# ---------------------------------------------------------------------------------------------
# Simple policies
# ---------------------------------------------------------------------------------------------


class OffPolicy(Policy):
    """Plain decoding: verify nothing (ℓ = 0); every step emits the target's own next token.
    Lossless trivially: the target samples every token itself."""

    def choose(self, view: BatchView) -> list[int]:
        return [0] * view.num_requests

    def plan(self, view: BatchView) -> bool:
        return False


class FixedPolicy(Policy):
    """Verify the first ``length`` drafts of every request (None = the whole block).
    Lossless: ℓ is a constant. Under a budget the cut keeps the most likely tokens (see
    :func:`trim_to_budget`)."""

    def __init__(self, length: int | None = None):
        if length is not None and length < 0:
            raise ValueError("length must be >= 0")
        self.length = length

    def plan(self, view: BatchView) -> bool:
        return self.length != 0

    def choose(self, view: BatchView) -> list[int]:
        n = view.gamma if self.length is None else min(self.length, view.gamma)
        lengths = np.minimum(view.limits(), n)
        a = survival(view.confidences) if view.confidences is not None else None
        return trim_to_budget(lengths, a, view.budget_tokens)


class ThresholdPolicy(Policy):
    """DeepSpec's static rule: verify drafts up to (excluding) the first whose conditional
    confidence c_k is below ``threshold``. Without confidences, verify the whole block.

    Lossless: d_k is verified iff c_1..c_k >= threshold, and c_k depends on d_<k only; scanning
    left to right never looks at a later confidence to decide about an earlier token.
    """

    def __init__(self, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        self.threshold = threshold

    def choose(self, view: BatchView) -> list[int]:
        if view.confidences is None:
            return trim_to_budget(view.limits(), None, view.budget_tokens)
        c = np.asarray(view.confidences, dtype=np.float64)  # [R, γ]
        below = c < self.threshold
        # index of the first low-confidence draft, or γ when there is none
        first = np.where(below.any(axis=1), below.argmax(axis=1), c.shape[1])
        return trim_to_budget(np.minimum(first, view.limits()), survival(c), view.budget_tokens)
