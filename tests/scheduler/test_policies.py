"""Verify-length policies: the view, fixed, off, static confidence threshold, ranking, budgets, clipping."""

from __future__ import annotations

import numpy as np
import pytest

from dspark.scheduler.policies import (
    BatchView,
    FixedPolicy,
    OffPolicy,
    ThresholdPolicy,
    clip_lengths,
    decide_lengths,
    rank_candidates,
    survival,
    trim_to_budget,
)


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


# ------------------------------------------------------------------ the view, budgets, the engine's entry


def test_batch_view_checks_shapes():
    BatchView(np.ones((2, 3)), 3, ("a", "b"))
    BatchView(None, 3, ("a", "b"), budget_tokens=0, max_lengths=(1, 0))
    with pytest.raises(ValueError):
        BatchView(np.ones((2, 4)), 3, ("a", "b"))
    with pytest.raises(ValueError):
        BatchView(None, 3, ("a",), max_lengths=(1, 2))
    with pytest.raises(ValueError):
        BatchView(None, 3, ("a",), budget_tokens=-1)
    v = BatchView(None, 4, ("a", "b", "c"), max_lengths=(9, 2, -1))
    assert v.limits().tolist() == [4, 2, 0]
    assert BatchView.of(None, 4, 2).request_ids == ("0", "1")


def test_new_and_old_interfaces_agree():
    c = np.array([[0.9, 0.3, 0.9], [0.8, 0.8, 0.8]])
    for pol in (OffPolicy(), FixedPolicy(2), ThresholdPolicy(0.5)):
        assert pol.choose(BatchView.of(c, 3, 2)) == pol(c, 3, 2)


def test_survival_and_ranking():
    a = survival(np.array([[0.9, 0.5, 1.0], [1.2, np.nan, 0.5]]))
    assert np.allclose(a, [[0.9, 0.45, 0.45], [1.0, 0.0, 0.0]])
    rows, cols = rank_candidates(a, np.array([3, 2]))
    # (1,0)=1.0, (0,0)=.9, (0,1)=.45, (0,2)=.45 (tie: the smaller j first), (1,1)=0
    assert list(zip(rows.tolist(), cols.tolist())) == [(1, 0), (0, 0), (0, 1), (0, 2), (1, 1)]


def test_ranking_is_prefix_closed_even_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(100):
        c = rng.choice([0.0, 0.5, 1.0], size=(5, 4))  # many exact ties
        limits = rng.integers(0, 5, size=5)
        rows, cols = rank_candidates(survival(c), limits)
        for n in range(len(rows) + 1):
            seen = {}
            for r, j in zip(rows[:n].tolist(), cols[:n].tolist()):
                assert j == seen.get(r, 0), "a request's j is admitted right after its j-1"
                seen[r] = j + 1


@pytest.mark.parametrize("pol", [OffPolicy(), FixedPolicy(), FixedPolicy(2), ThresholdPolicy(0.3)],
                         ids=["off", "fixed", "fixed-2", "threshold"])
def test_every_simple_policy_honours_budget_and_limits(pol):
    rng = np.random.default_rng(2)
    for _ in range(50):
        R, G = rng.integers(1, 8), rng.integers(1, 6)
        c = rng.random((R, G)) if rng.random() < 0.8 else None
        budget = int(rng.integers(0, R * G + 2))
        lim = tuple(int(x) for x in rng.integers(-1, G + 2, size=R))
        view = BatchView(c, int(G), tuple(f"r{i}" for i in range(R)), budget, lim)
        ell = pol.choose(view)
        assert len(ell) == R and sum(ell) <= budget
        assert all(0 <= l <= m for l, m in zip(ell, view.limits()))


def test_budget_keeps_the_most_likely_tokens():
    c = np.array([[0.9, 0.9, 0.9], [0.5, 0.9, 0.9], [0.95, 0.2, 0.9]])
    # survival: [.9 .81 .729], [.5 .45 .405], [.95 .19 .171]
    view = BatchView(c, 3, ("a", "b", "c"), budget_tokens=4)
    assert FixedPolicy().choose(view) == [3, 0, 1]
    # without confidences the cut is breadth-first
    assert FixedPolicy().choose(BatchView(None, 3, ("a", "b", "c"), budget_tokens=4)) == [2, 1, 1]
    assert trim_to_budget([3, 1], np.array([[0.9, 0.8, 0.1], [0.95, 0.5, 0.4]]), 2) == [1, 1]
    assert trim_to_budget([3, 1], None, None) == [3, 1]


def test_decide_lengths_enforces_limits_and_budget_on_any_policy():
    def greedy_legacy(confidences, gamma, num_requests):  # the first interface: verifies everything
        return [gamma + 5] * num_requests

    c = np.full((3, 4), 0.9)
    view = BatchView(c, 4, ("a", "b", "c"), budget_tokens=5, max_lengths=(4, 1, 0))
    ell = decide_lengths(greedy_legacy, view)
    assert ell == [4, 1, 0]  # 5 tokens: limits respected, budget exactly used
    view = BatchView(c, 4, ("a", "b", "c"), budget_tokens=3)
    assert decide_lengths(greedy_legacy, view) == [1, 1, 1]  # ties: breadth-first by j
    with pytest.raises(ValueError):
        decide_lengths(lambda c, g, n: [1], view)
