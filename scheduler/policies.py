"""Verify-length policies: given drafts' confidences, how many of each request's γ drafted
tokens the target verifies this step. Pure Python/numpy, no torch.

Every policy here is lossless by construction: a request's verify length ℓ_r is chosen from
quantities that do not condition on the target's verdict, and rejection sampling is exact for any
prefix length chosen *before* the verdict — with one subtlety: the confidence c_k of DSpark depends
on the sampled draft tokens d_<k, so a rule that looks at later confidences to decide whether to
keep an earlier token can bias the output (DSpark paper, Appendix A). ``threshold`` truncates at
the first low confidence scanning left to right, which is non-anticipating.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

__all__ = ["VerifyPolicy", "OffPolicy", "FixedPolicy", "ThresholdPolicy", "clip_lengths"]


class VerifyPolicy(Protocol):
    def __call__(self, confidences: np.ndarray | None, gamma: int, num_requests: int) -> list[int]:
        """``confidences`` [R, γ] (or None when the drafter has no confidence head) -> ℓ_r per request."""
        ...


class OffPolicy:
    """Plain decoding: verify nothing (ℓ = 0); every step emits the target's own next token."""

    def __call__(self, confidences: np.ndarray | None, gamma: int, num_requests: int) -> list[int]:
        return [0] * num_requests


class FixedPolicy:
    """Verify the first ``length`` drafts of every request (None = the whole block)."""

    def __init__(self, length: int | None = None):
        if length is not None and length < 0:
            raise ValueError("length must be >= 0")
        self.length = length

    def __call__(self, confidences: np.ndarray | None, gamma: int, num_requests: int) -> list[int]:
        n = gamma if self.length is None else min(self.length, gamma)
        return [n] * num_requests


class ThresholdPolicy:
    """DeepSpec's static rule: verify drafts up to (excluding) the first whose conditional
    confidence c_k is below ``threshold``. Without confidences, verify the whole block."""

    def __init__(self, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        self.threshold = threshold

    def __call__(self, confidences: np.ndarray | None, gamma: int, num_requests: int) -> list[int]:
        if confidences is None:
            return [gamma] * num_requests
        c = np.asarray(confidences, dtype=np.float64)  # [R, γ]
        below = c < self.threshold
        # index of the first low-confidence draft, or γ when there is none
        first = np.where(below.any(axis=1), below.argmax(axis=1), c.shape[1])
        return [int(x) for x in first]


def clip_lengths(lengths: Sequence[int], limits: Sequence[int]) -> list[int]:
    """Element-wise min(ℓ_r, limit_r), never below 0."""
    return [max(0, min(int(a), int(b))) for a, b in zip(lengths, limits)]
