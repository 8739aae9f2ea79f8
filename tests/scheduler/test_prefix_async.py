"""Algorithm 1 (``prefix``) and its production variant (``async``) on hand-made confidences and
SPS curves; budgets, limits, request churn; the non-anticipation property (with a negative
control); the registry and its strict configs."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dspark.scheduler.async_prefix import AsyncPrefixPolicy, global_capacity, stale_survival, top_k_lengths
from dspark.scheduler.policies import BatchView, FixedPolicy, OffPolicy, ThresholdPolicy, rank_candidates, survival
from dspark.scheduler.prefix import PrefixPolicy, goodput_curve, prefix_lengths
from dspark.scheduler.registry import build_policy, parse_policy_config
from dspark.scheduler.sps import SPSProfile, h100_like

APPENDIX_A = SPSProfile.from_points([(1, 1.0), (2, 0.5), (3, 0.45)])


def view(c, ids=None, **kw) -> BatchView:
    c = np.asarray(c, dtype=np.float64)
    return BatchView(c, c.shape[1], tuple(ids or (f"r{i}" for i in range(c.shape[0]))), **kw)


def linear_cost(t0: float):
    """SPS(B) = 1 / (t0 + B): fixed cost t0 per step plus one unit per token. t0 large = flat
    (the device is idle: tokens are nearly free); t0 = 0 = every token costs the same (busy)."""
    return lambda b: 1.0 / (t0 + b)


def test_worked_example_of_appendix_a():
    a = np.array([[0.8, 0.72]])
    rows, cols = rank_candidates(a, np.array([2]))
    assert np.allclose(goodput_curve(a, rows, cols, APPENDIX_A), [1.0, 0.9, 1.134])
    assert prefix_lengths(a, np.array([2]), APPENDIX_A) == [0]  # the break stops at Θ = 0.9 < 1.0
    assert global_capacity(a, np.array([2]), APPENDIX_A) == 2  # the global search would take both


def test_prefix_by_hand():
    c = [[0.9, 0.9, 0.1], [0.6, 0.5, 0.5]]
    # a = [.9 .81 .081], [.6 .3 .15]; SPS = 1/(4+B); Θ: 2/6, 2.9/7, 3.71/8, 4.31/9 (all rising),
    # then 4.61/10 falls: break before (1, 2)
    assert PrefixPolicy(linear_cost(4)).choose(view(c)) == [2, 1]


def test_prefix_verifies_more_when_sps_is_flat_and_less_when_it_drops_steeply():
    rng = np.random.default_rng(0)
    c = rng.uniform(0.3, 0.99, size=(8, 6))
    totals = [sum(PrefixPolicy(linear_cost(t0)).choose(view(c))) for t0 in (0, 1, 4, 16, 64, 256, 1e9)]
    assert totals == sorted(totals), totals
    assert totals[0] == 0  # SPS ∝ 1/B (busy): a draft (a < 1) never pays for its token
    assert totals[-1] == 48  # flat SPS (idle): every draft is worth verifying
    assert 0 < totals[3] < 48
    flat = SPSProfile.from_points([(1, 10.0), (1000, 10.0)])
    assert sum(PrefixPolicy(flat).choose(view(c))) == 48


def step_curve() -> SPSProfile:
    """100 steps/s up to 8 tokens, 70 from 9 to 16 (a tile edge at 8), 40 beyond."""
    return SPSProfile.from_points([(1, 100.0), (8, 100.0), (9, 70.0), (16, 70.0), (17, 40.0), (64, 40.0)])


def test_prefix_stops_at_a_tile_edge_and_the_stale_global_search_crosses_it():
    c = np.full((4, 4), 0.95)
    # prefix: 4 drafts fill the first tile (B = 8, Θ = 7.8·100); the 5th costs the edge (8.70·70 < 780)
    assert PrefixPolicy(step_curve()).choose(view(c)) == [1, 1, 1, 1]
    # the global search sees that 12 drafts (B = 16: τ = 14.84, Θ = 1039) beat the first tile
    assert global_capacity(survival(c), np.full(4, 4), step_curve()) == 12
    pol = AsyncPrefixPolicy(step_curve(), lag=2)
    got = [pol.choose(view(c)) for _ in range(4)]
    assert got[:2] == [[1, 1, 1, 1]] * 2  # start-up: no history yet, Algorithm 1 decides
    assert got[2:] == [[3, 3, 3, 3]] * 2
    assert pol.cold_steps == 2 and pol.last_capacity == 12


def test_async_capacity_comes_from_stale_confidences_and_ranking_from_current_ones():
    sps = linear_cost(4)
    pol = AsyncPrefixPolicy(sps, lag=2)
    high, low = np.full((2, 3), 0.99), np.full((2, 3), 0.05)
    pol.choose(view(high))  # step 0: recorded
    pol.choose(view(low))  # step 1: recorded
    k_high = global_capacity(survival(high), np.full(2, 3), sps)
    assert k_high == 6
    # step 2 is sized by step 0 (high) although its own drafts look hopeless
    assert sum(pol.choose(view(low))) == k_high and pol.last_capacity == k_high
    # step 3 is sized by step 1 (low): nothing, although the current drafts look perfect
    assert pol.choose(view(high)) == [0, 0]
    # which tokens fill the capacity is decided by the current survival
    pol = AsyncPrefixPolicy(sps, lag=1)
    pol.choose(view([[0.99, 0.99], [0.99, 0.99]]))  # K for the next step: 4
    assert pol.choose(view([[0.99, 0.99], [0.1, 0.1]])) == [2, 2]
    old, new = np.array([[0.9, 0.9], [0.3, 0.3]]), np.array([[0.3, 0.3], [0.9, 0.9]])
    pol = AsyncPrefixPolicy(sps, lag=1)
    pol.choose(view(old))
    k = global_capacity(survival(old), np.full(2, 2), sps)
    assert 0 < k < 4
    assert pol.choose(view(new)) == top_k_lengths(survival(new), np.full(2, 2), k)
    assert pol.choose(view(new))[1] == 2  # the second request is the confident one now


def test_async_handles_requests_coming_and_going():
    pol = AsyncPrefixPolicy(linear_cost(8), lag=2)
    pol.choose(view([[0.9, 0.9], [0.2, 0.2]], ids=("a", "b")))
    pol.choose(view([[0.9, 0.9]], ids=("a",)))  # b left
    # c and d are new: they are sized by the mean of what was recorded two steps ago
    ell = pol.choose(view([[0.9, 0.9], [0.9, 0.9], [0.9, 0.9]], ids=("a", "c", "d")))
    stale = stale_survival(("a", "c", "d"), {"a": 0, "b": 1}, np.array([[0.9, 0.81], [0.2, 0.04]]))
    assert np.allclose(stale, [[0.9, 0.81], [0.55, 0.425], [0.55, 0.425]])
    assert sum(ell) == global_capacity(stale, np.full(3, 2), linear_cost(8))
    assert len(pol.history) <= 2  # only the last `lag` steps are kept
    assert stale_survival(("a",), {}, np.zeros((0, 2))) is None


def test_async_rows_without_drafts_are_not_recorded():
    pol = AsyncPrefixPolicy(linear_cost(8), lag=1)
    pol.choose(view([[0.9, 0.9], [0.0, 0.0]], max_lengths=(2, 0)))
    assert pol.history.lookup(("r0",), 1, 2).tolist() == [[0.9, 0.81]]
    assert pol.history.lookup(("r1",), 1, 2).tolist() == [[0.9, 0.81]]  # unknown: the mean of the one recorded row


@pytest.mark.parametrize("make", [lambda s: PrefixPolicy(s), lambda s: AsyncPrefixPolicy(s, lag=1),
                                  lambda s: AsyncPrefixPolicy(s, lag=2)], ids=["prefix", "async-1", "async-2"])
def test_budget_and_limits_are_honoured(make):
    rng = np.random.default_rng(3)
    for sps in (linear_cost(1e6), linear_cost(8), h100_like(256)):
        pol = make(sps)
        for step in range(40):
            R, G = int(rng.integers(1, 9)), 4
            ids = tuple(f"r{i}" for i in rng.choice(12, size=R, replace=False))
            budget = None if rng.random() < 0.3 else int(rng.integers(0, R * G + 1))
            lim = tuple(int(x) for x in rng.integers(0, G + 1, size=R))
            c = rng.random((R, G)) if rng.random() < 0.9 else None
            v = BatchView(c, G, ids, budget, lim)
            ell = pol.choose(v)
            assert len(ell) == R and all(0 <= l <= m for l, m in zip(ell, lim))
            assert budget is None or sum(ell) <= budget


def test_no_confidence_head_uses_the_prior():
    v = BatchView(None, 4, ("a", "b"))
    assert PrefixPolicy(linear_cost(1e9)).choose(v) == [4, 4]  # idle device: everything
    assert PrefixPolicy(linear_cost(0)).choose(v) == [0, 0]  # busy: nothing
    assert PrefixPolicy(linear_cost(1e9)).choose(BatchView(None, 4, ("a", "b"), budget_tokens=3)) == [2, 1]
    assert PrefixPolicy(linear_cost(2), prior=0.0).choose(v) == [0, 0]


# ------------------------------------------------------------------ non-anticipation


def unsafe_global(v: BatchView, sps) -> list[int]:
    """Appendix A's search: the best stopping point over *current* survivals (no early break)."""
    a, lim = survival(v.confidences), v.limits()
    return top_k_lengths(a, lim, global_capacity(a, lim, sps, v.budget_tokens))


def anticipation_violations(decide, trials: int = 400, seed: int = 4) -> int:
    """How often changing c_{r,k+1..γ} (functions of the sampled d_{r,k}) changes whether d_{r,k}
    is verified. A lossless rule never lets that happen."""
    rng = np.random.default_rng(seed)
    bad = 0
    for _ in range(trials):
        R, G = int(rng.integers(1, 5)), 4
        c = rng.uniform(0.2, 1.0, size=(R, G))
        r, k = int(rng.integers(R)), int(rng.integers(1, G))  # draft d_{r,k}, 1-based k < γ
        c2 = c.copy()
        c2[r, k:] = rng.uniform(0.0, 1.0, size=G - k)
        budget = None if rng.random() < 0.5 else int(rng.integers(1, R * G))
        before = decide(view(c, budget_tokens=budget))[r] >= k
        after = decide(view(c2, budget_tokens=budget))[r] >= k
        bad += before != after
    return bad


@pytest.mark.parametrize("sps", [APPENDIX_A, linear_cost(3), step_curve(), h100_like(64)], ids=["appA", "linear", "step", "h100"])
def test_lossless_policies_never_anticipate(sps):
    assert anticipation_violations(PrefixPolicy(sps).choose) == 0

    def async_with_history(v):
        pol = AsyncPrefixPolicy(sps, lag=2)
        rng = np.random.default_rng(9)  # the same history for both calls of a trial
        for _ in range(2):
            pol.choose(view(rng.uniform(0.2, 1.0, size=v.confidences.shape)))
        return pol.choose(v)

    assert anticipation_violations(async_with_history) == 0
    assert anticipation_violations(FixedPolicy().choose) == 0
    assert anticipation_violations(ThresholdPolicy(0.5).choose) == 0


@pytest.mark.parametrize("sps", [APPENDIX_A, step_curve()], ids=["appA", "step"])
def test_the_same_check_catches_the_global_search(sps):
    # negative control: the best stopping point over the current survivals lets later drafts
    # decide whether earlier ones are verified
    assert anticipation_violations(lambda v: unsafe_global(v, sps)) > 0


def test_the_global_search_equals_the_break_when_goodput_is_unimodal():
    # SPS = 1/(t0 + B) with gains sorted down makes Θ_n unimodal: the break is then globally
    # optimal (paper §3.2.2), the two rules agree and no leak exists to be caught
    rng = np.random.default_rng(5)
    for _ in range(200):
        c = rng.uniform(0.1, 1.0, size=(int(rng.integers(1, 6)), 4))
        sps = linear_cost(float(rng.uniform(0, 20)))
        assert PrefixPolicy(sps).choose(view(c)) == unsafe_global(view(c), sps)


# ------------------------------------------------------------------ registry and configs


def test_build_policy_by_name(tmp_path):
    path = h100_like(512).save(tmp_path / "sps.json")
    assert isinstance(build_policy("off"), OffPolicy)
    assert build_policy("fixed", length=3).length == 3
    assert build_policy("threshold", threshold=0.25).threshold == 0.25
    p = build_policy("prefix", sps_profile=str(path), prior=0.5)
    assert isinstance(p, PrefixPolicy) and p.sps.tokens[-1] == 512 and p.prior == 0.5
    a = build_policy("async", sps=APPENDIX_A, lag=3)
    assert isinstance(a, AsyncPrefixPolicy) and a.lag == 3 and a.sps is APPENDIX_A
    assert build_policy("async", sps_profile="h100_like").sps.source == "synthetic:h100_like"


def test_policy_configs_are_strict():
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("fastest")
    with pytest.raises(ValueError, match="needs an SPS profile"):
        build_policy("prefix")
    with pytest.raises(ValidationError):
        build_policy("async", sps=APPENDIX_A, lag=0)  # capacity from the current step: not lossless
    with pytest.raises(ValidationError):
        build_policy("fixed", threshold=0.3)  # a field of another policy
    with pytest.raises(ValidationError):
        build_policy("threshold", threshold=1.5)
    with pytest.raises(ValidationError):
        parse_policy_config({"name": "prefix", "sps_profile": "h100_like", "lag": 2})
    cfg = parse_policy_config({"name": "async", "lag": 4, "sps_profile": "h100_like"})
    assert cfg.name == "async" and cfg.lag == 4
    with pytest.raises(ValueError):
        AsyncPrefixPolicy(APPENDIX_A, lag=0)
