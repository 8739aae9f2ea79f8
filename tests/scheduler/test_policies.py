"""Verify-length policies: fixed, off, static confidence threshold, clipping."""

from __future__ import annotations

import numpy as np
import pytest

from dspark.scheduler.policies import FixedPolicy, OffPolicy, ThresholdPolicy, clip_lengths


def test_off_and_fixed():
    assert OffPolicy()(None, 5, 3) == [0, 0, 0]
    assert FixedPolicy()(None, 5, 2) == [5, 5]
    assert FixedPolicy(3)(np.ones((2, 5)), 5, 2) == [3, 3]
    assert FixedPolicy(9)(None, 4, 1) == [4]  # never more than γ
    with pytest.raises(ValueError):
        FixedPolicy(-1)


def test_threshold_stops_at_the_first_low_confidence():
    c = np.array([
        [0.9, 0.8, 0.7, 0.6],
        [0.9, 0.3, 0.9, 0.9],  # a later high confidence does not resurrect the block
        [0.1, 0.9, 0.9, 0.9],
        [0.5, 0.5, 0.5, 0.5],  # == threshold is kept
    ])
    assert ThresholdPolicy(0.5)(c, 4, 4) == [4, 1, 0, 4]
    assert ThresholdPolicy(0.0)(c, 4, 4) == [4, 4, 4, 4]
    assert ThresholdPolicy(1.0)(c, 4, 4) == [0, 0, 0, 0]
    assert ThresholdPolicy(0.5)(None, 4, 2) == [4, 4]  # no confidence head: whole block
    with pytest.raises(ValueError):
        ThresholdPolicy(1.5)


def test_threshold_is_non_anticipating():
    """ℓ depends only on c_1..c_ℓ+1: changing confidences after the cut never changes ℓ."""
    rng = np.random.default_rng(0)
    pol = ThresholdPolicy(0.4)
    for _ in range(200):
        c = rng.random((1, 6))
        n = pol(c, 6, 1)[0]
        if n + 1 < 6:
            c2 = c.copy()
            c2[0, n + 1 :] = rng.random(6 - n - 1)
            assert pol(c2, 6, 1)[0] == n


def test_clip_lengths():
    assert clip_lengths([4, 4, 2, 3], [10, 1, 0, -1]) == [4, 1, 0, 0]
