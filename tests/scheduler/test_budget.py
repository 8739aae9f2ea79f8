"""Cluster verify budgets on hand-made step-cost curves: flat vs steep, idle vs busy, acceptance,
jagged profiles, and the cluster cap against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dspark.scheduler.budget import ReplicaDemand, expected_tokens, goodput_curve, plan_budgets, step_time
from dspark.scheduler.sps import h100_like

GAMMA = 7
FLAT = [(b, 100.0) for b in range(1, 257)]  # every batch size costs the same step
STEEP = [(b, 1000.0 / b) for b in range(1, 257)]  # step time proportional to the tokens
# memory-bound up to 64 tokens, compute-bound past it (the usual GPU shape)
KNEE = [(b, 100.0 if b <= 64 else 100.0 * 64 / b) for b in range(1, 513)]


def demand(table, *, running=8, queue=0, load=1.0, alpha=0.8, rid="r", max_batch=64, gamma=GAMMA):
    return ReplicaDemand(rid, table, gamma, max_batch, running, queue, load, alpha)


def budget(table, **kw) -> int:
    return plan_budgets([demand(table, **kw)])["r"].budget_tokens


def test_step_time_reads_the_profile_like_sps_does():
    table = [(8, 100.0), (16, 50.0), (17, 25.0), (64, 25.0)]  # a jump between 16 and 17 tokens
    assert step_time(table, np.array([1, 8, 12, 16, 17, 64])).tolist() == pytest.approx([0.01, 0.01, 1 / 75, 0.02, 0.04, 0.04])


def test_plan_stays_inside_the_profile():
    # nothing is known past the largest profiled batch: no budget takes the forward there
    assert budget([(b, 100.0) for b in range(1, 41)], running=8, load=0.0) == 40 - 8
    assert budget([(b, 100.0) for b in range(1, 5)], running=8, load=0.0) == 0


def test_expected_tokens_spreads_the_budget_evenly():
    # α = 0.5, R = 2: b = 3 -> one request verifies 2 (1 + .5 + .25), the other 1 (1 + .5)
    assert expected_tokens(0.5, 2, GAMMA, np.array([0, 1, 3])).tolist() == pytest.approx([2.0, 2.5, 3.25])
    assert expected_tokens(1.0, 4, GAMMA, np.array([10, 28, 99])).tolist() == [14, 32, 32]  # α = 1: every draft counts, ≤ R·γ
    assert expected_tokens(0.0, 4, GAMMA, np.array([0, 28])).tolist() == [4, 4]


def test_flat_curve_verifies_everything_steep_curve_nothing():
    # fully busy replica (u = 1): the objective is exactly Θ = τ·SPS(B)
    assert budget(FLAT, running=8) == 8 * GAMMA
    assert budget(STEEP, running=8) == 0
    # on the knee curve, verify up to the knee and stop: B = 64 tokens
    assert budget(KNEE, running=16, alpha=0.8) == 64 - 16
    assert budget(KNEE, running=64) == 0  # already compute-bound


def test_more_requests_means_fewer_verify_tokens_per_request():
    per_request = [budget(KNEE, running=r) / r for r in (1, 4, 8, 16, 32, 48, 64)]
    assert per_request == sorted(per_request, reverse=True)
    assert per_request[0] == GAMMA and per_request[-1] == 0


def test_queued_requests_count_up_to_the_batch_limit():
    assert plan_budgets([demand(KNEE, running=16, queue=100, max_batch=32)])["r"].requests == 32
    assert budget(KNEE, running=16, queue=16) == budget(KNEE, running=32)
    assert plan_budgets([demand(KNEE, running=0, queue=0)])["r"].requests == 1  # idle: planned for its next request


def test_idle_replica_verifies_more_than_busy_one():
    idle = budget(KNEE, running=32, load=0.1)
    busy = budget(KNEE, running=32, load=0.95)
    assert idle > busy == 32
    assert budget(STEEP, running=8, load=0.3) > budget(STEEP, running=8, load=1.0) == 0


@pytest.mark.parametrize("table", [FLAT, STEEP, KNEE], ids=["flat", "steep", "knee"])
def test_budget_never_grows_with_load_or_falling_acceptance(table):
    for running in (1, 8, 32, 64):
        by_load = [budget(table, running=running, load=u) for u in np.linspace(0, 1, 11)]
        assert by_load == sorted(by_load, reverse=True), (running, by_load)
        for u in (0.2, 1.0):
            by_alpha = [budget(table, running=running, load=u, alpha=a) for a in np.linspace(0, 1, 11)]
            assert by_alpha == sorted(by_alpha), (running, u, by_alpha)


def test_no_acceptance_no_drafts_and_no_gamma_no_budget():
    assert budget(FLAT, alpha=0.0) == 0  # nothing to gain: ties go to the smallest budget
    assert budget(FLAT, gamma=0) == 0


def test_jagged_profile_is_searched_globally():
    # h100_like: flat while the weights dominate, small steps at every 64-token wave, then
    # 128-token compute tiles. The small wave steps make G non-unimodal.
    prof = h100_like(2048)
    d = demand(list(zip(prof.tokens, prof.steps_per_s)), running=32, alpha=0.8, max_batch=256)
    g = goodput_curve(d)
    b = plan_budgets([d])["r"].budget_tokens
    assert b == int(np.argmax(g)) == 32 * GAMMA
    # Algorithm 1's greedy-with-break would stop at the first wave step, far below
    first_drop = next(i for i in range(len(g) - 1) if g[i + 1] <= g[i])
    assert first_drop < b and g[b] > 1.3 * g[first_drop]


def test_goodput_reported_is_the_curve_value():
    p = plan_budgets([demand(KNEE, running=16)])["r"]
    g = goodput_curve(demand(KNEE, running=16))
    assert p.goodput == pytest.approx(g.max()) and p.goodput_plain == pytest.approx(g[0])
    assert p.goodput >= p.goodput_plain


def _brute_force(demands, cap):
    curves = [goodput_curve(d) for d in demands]
    best = -1.0
    for bs in itertools.product(*(range(len(g)) for g in curves)):
        if sum(bs) <= cap:
            best = max(best, sum(g[b] for g, b in zip(curves, bs)))
    return best


def test_cluster_cap_is_respected_and_goes_where_it_pays():
    good = demand(FLAT, rid="good", running=2, alpha=0.9)  # flat: drafts are free there
    poor = demand(KNEE, rid="poor", running=32, alpha=0.5, load=1.0)
    free = plan_budgets([good, poor])
    assert free["good"].budget_tokens == 14 and free["poor"].budget_tokens > 0
    capped = plan_budgets([good, poor], cluster_cap=14)
    assert capped["good"].budget_tokens == 14 and capped["poor"].budget_tokens == 0
    # a cap above the free optimum changes nothing
    loose = plan_budgets([good, poor], cluster_cap=10_000)
    assert {k: v.budget_tokens for k, v in loose.items()} == {k: v.budget_tokens for k, v in free.items()}


def test_cluster_cap_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    tables = [FLAT, STEEP, KNEE, [(4, 100.0), (12, 70.0), (24, 65.0), (40, 30.0)]]
    worst = 1.0
    for _ in range(40):
        demands = [
            ReplicaDemand(f"r{i}", tables[rng.integers(len(tables))], int(rng.integers(1, 5)), 64,
                          int(rng.integers(1, 5)), 0, float(rng.uniform(0.2, 1.0)), float(rng.uniform(0.3, 0.95)))
            for i in range(3)
        ]
        cap = int(rng.integers(0, 30))
        plans = plan_budgets(demands, cluster_cap=cap)
        assert sum(p.budget_tokens for p in plans.values()) <= cap
        got = sum(p.goodput for p in plans.values())
        worst = min(worst, got / _brute_force(demands, cap))
    assert worst > 0.97, worst
