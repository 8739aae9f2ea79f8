"""Draft cost in the scheduled policies: the profile's draft table, Θ with a sunk draft pass,
the pre-draft gate (skip the pass when it cannot pay), and the cluster budget pricing it."""

from __future__ import annotations

import numpy as np
import pytest

from dspark.scheduler.async_prefix import AsyncPrefixPolicy, global_capacity
from dspark.scheduler.budget import ReplicaDemand, goodput_curve as budget_curve
from dspark.scheduler.policies import BatchView, FixedPolicy, OffPolicy, rank_candidates, should_draft, survival
from dspark.scheduler.prefix import PrefixPolicy, draft_capacity, goodput_curve, prefix_lengths
from dspark.scheduler.registry import build_policy
from dspark.scheduler.sps import SPSProfile, draft_seconds, h100_like

FLAT = [(1, 100.0), (64, 100.0)]  # 10 ms per verify forward whatever B


def flat(draft_ms: float | None) -> SPSProfile:
    return SPSProfile.from_points(FLAT, draft_points=() if draft_ms is None else ((1, draft_ms / 1e3), (64, draft_ms / 1e3)))


def view(c, ids=None, **kw) -> BatchView:
    c = None if c is None else np.asarray(c, dtype=np.float64)
    n = len(ids) if c is None else c.shape[0]
    return BatchView(c, kw.pop("gamma", 2 if c is None else c.shape[1]), tuple(ids or (f"r{i}" for i in range(n))), **kw)


def test_profile_draft_points_round_trip_and_interpolate(tmp_path):
    p = SPSProfile.from_points([(1, 10.0), (8, 5.0)], draft_points=((8, 0.004), (1, 0.002)))
    assert p.draft_points == ((1, 0.002), (8, 0.004))  # sorted
    assert p.draft_time_s(1) == 0.002 and p.draft_time_s(100) == 0.004 and p.draft_time_s(0) == 0.0
    assert p.draft_time_s(4) == pytest.approx(0.002 + 3 / 7 * 0.002)
    q = SPSProfile.load(p.save(tmp_path / "p.json"))
    assert q.draft_points == p.draft_points and q.tokens == p.tokens
    assert SPSProfile.from_points([(1, 10.0)]).draft_time_s(4) == 0.0  # not measured: free
    assert draft_seconds(lambda b: 10.0, 4) == 0.0
    with pytest.raises(ValueError, match="draft"):
        SPSProfile.from_points([(1, 10.0)], draft_points=((0, 0.1),))
    with pytest.raises(ValueError, match="draft"):
        SPSProfile.from_points([(1, 10.0)], draft_points=((1, -1.0),))
    assert h100_like(256).draft_time_s(1) > 0


def test_sunk_draft_cost_makes_verifying_relatively_cheaper():
    a = np.array([[0.8, 0.72]])
    prof = SPSProfile.from_points([(1, 1.0), (2, 0.5), (3, 0.45)])
    rows, cols = rank_candidates(a, np.array([2]))
    # d = 1 s: Θ = 1/2, 1.8/3, 2.52/3.22 -> rising all the way: verify both
    assert np.allclose(goodput_curve(a, rows, cols, prof, 1.0), [0.5, 0.6, 2.52 / (1 + 1 / 0.45)])
    assert prefix_lengths(a, np.array([2]), prof) == [0]
    assert prefix_lengths(a, np.array([2]), prof, draft_s=1.0) == [2]
    assert global_capacity(a, np.array([2]), prof, draft_s=1.0) == 2


def test_draft_capacity_weighs_the_draft_pass_against_plain_decoding():
    a = survival([[0.9, 0.9]])
    assert draft_capacity(a, np.array([2]), flat(None)) == 2  # free drafts on a flat curve: all
    assert draft_capacity(a, np.array([2]), flat(5.0)) == 2  # 2.71 / 15 ms = 181/s > 100/s
    assert draft_capacity(a, np.array([2]), flat(20.0)) == 0  # 2.71 / 30 ms = 90/s < 100/s
    assert draft_capacity(a, np.array([0]), flat(None)) == 0  # nothing may be verified
    assert draft_capacity(a, np.array([2]), flat(None), budget=1) == 1


@pytest.mark.parametrize("make", [lambda s: PrefixPolicy(s), lambda s: AsyncPrefixPolicy(s, lag=2)], ids=["prefix", "async"])
def test_gate_skips_drafting_that_cannot_pay_and_refreshes(make):
    pol = make(flat(20.0))
    pre = view(None, ids=("a", "b"))
    assert pol.plan(pre)  # nothing recorded yet: draft to learn
    pol.choose(view([[0.9, 0.9], [0.9, 0.9]], ids=("a", "b")))
    assert not pol.plan(pre)  # 2·2.71 / 30 ms < 2·100/s: skip the draft pass
    # cheap drafts pay: a policy on the same history with a 5 ms draft drafts
    cheap = make(flat(5.0))
    cheap.choose(view([[0.9, 0.9], [0.9, 0.9]], ids=("a", "b")))
    assert cheap.plan(pre)
    # low acceptance never pays, even with free drafts, when verify cost grows with B
    busy = make(lambda b: 100.0 / b)  # every token costs the same
    busy.choose(view([[0.2, 0.2], [0.2, 0.2]], ids=("a", "b")))
    assert not busy.plan(pre)
    # refresh: after `refresh` skipped steps in a row it drafts once
    pol = make(flat(20.0))
    pol.gate.refresh = 3
    pol.choose(view([[0.9, 0.9], [0.9, 0.9]], ids=("a", "b")))
    decisions = [pol.plan(pre) for _ in range(4)]
    assert decisions == [False, False, False, True]
    pol.choose(view([[0.9, 0.9], [0.9, 0.9]], ids=("a", "b")))
    assert not pol.plan(pre) and pol.gate.total_skipped == 4


def test_should_draft_entry_point():
    pre = view(None, ids=("a", "b"))
    assert not should_draft(OffPolicy(), pre)
    assert not should_draft(FixedPolicy(0), pre)
    assert should_draft(FixedPolicy(2), pre)
    assert should_draft(lambda c, g, n: [0] * n, pre)  # the old interface always drafts
    assert not should_draft(FixedPolicy(2), view(None, ids=("a", "b"), budget_tokens=0))
    assert not should_draft(FixedPolicy(2), view(None, ids=("a", "b"), max_lengths=(0, 0)))
    assert build_policy("async", sps=flat(1.0), refresh=0).gate.refresh == 0


def test_budget_prices_the_draft_pass():
    def demand(draft):
        return ReplicaDemand("r", FLAT, 2, 8, 4, 0, 1.0, 0.9, draft)
    free, costly = budget_curve(demand(())), budget_curve(demand(((1, 0.02), (8, 0.02))))
    assert free[0] == costly[0] == pytest.approx(400.0)  # b = 0 skips drafting: 4 tokens / 10 ms
    assert int(np.argmax(free)) == 8 and int(np.argmax(costly)) == 0  # a 20 ms pass does not pay
    assert costly[8] == pytest.approx(4 * 2.71 / 0.03)
