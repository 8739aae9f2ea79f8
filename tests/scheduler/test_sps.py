"""Step-cost profiles: interpolation, step-wise curves, identity, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dspark.scheduler.sps import FORMAT, SPSProfile, evaluate_sps, h100_like


def test_piecewise_linear_and_flat_beyond_the_ends():
    p = SPSProfile.from_points([(16, 50.0), (8, 100.0), (32, 40.0)])  # any order in, sorted
    assert p.tokens == (8, 16, 32)
    assert p(8) == 100.0 and p(16) == 50.0
    assert p(12) == pytest.approx(75.0)
    assert p(24) == pytest.approx(45.0)
    assert p(1) == 100.0 and p(1000) == 40.0  # flat beyond the measured range
    assert np.allclose(p(np.array([8, 12, 40])), [100.0, 75.0, 40.0])
    assert isinstance(p(10), float)
    assert p.step_time_s(16) == pytest.approx(0.02)


def test_a_jump_between_adjacent_counts_is_exact_at_every_integer():
    # a tile edge at 128: flat plateaus on both sides, carried as (128, 100) and (129, 80)
    p = SPSProfile.from_points([(1, 100.0), (128, 100.0), (129, 80.0), (256, 80.0)])
    b = np.arange(1, 300)
    expected = np.where(b <= 128, 100.0, 80.0)
    assert np.array_equal(p(b), expected)


def test_h100_like_is_step_wise():
    h = h100_like()
    b = np.arange(1, 8193)
    s = h(b)
    assert np.all(np.diff(s) <= 1e-9), "steps/s never rises with more tokens"
    # flat inside every 64-token wave, a drop right after each edge
    for k in (1, 2, 5, 9, 30):
        inside = h(np.arange(64 * k + 1, 64 * (k + 1) + 1))
        assert np.ptp(inside) < 1e-9
        assert h(64 * k + 1) < h(64 * k)
    # memory-bound plateau (small jumps), then compute-bound tiles (big jumps every 128)
    small = h(64) / h(65)
    big = h(640) / h(641)
    assert small < 1.02 and big > 1.1
    assert h(8192) < 0.2 * h(1)
    assert h.source == "synthetic:h100_like" and h.matches(device="h100-like")


def test_validation():
    with pytest.raises(ValueError):
        SPSProfile((1, 1), (1.0, 2.0))  # not strictly increasing
    with pytest.raises(ValueError):
        SPSProfile((0, 4), (1.0, 2.0))  # B >= 1
    with pytest.raises(ValueError):
        SPSProfile((1, 4), (1.0, 0.0))  # steps/s > 0
    with pytest.raises(ValueError):
        SPSProfile((1, 4), (1.0, float("nan")))
    with pytest.raises(ValueError):
        SPSProfile((1, 4), (1.0,))
    with pytest.raises(ValueError):
        SPSProfile((), ())


def test_from_step_times_and_identity():
    p = SPSProfile.from_step_times([4, 1, 2], [0.04, 0.01, 0.02], target="t", config_hash="abc", device="cpu",
                                   dtype="float32", max_batch=4)
    assert p.tokens == (1, 2, 4) and p.steps_per_s == pytest.approx((100.0, 50.0, 25.0))
    assert p.matches(target="t", config_hash="abc", device="cpu", dtype="float32", max_batch=4)
    assert not p.matches(config_hash="other")
    assert not p.matches(max_batch=8)


def test_json_round_trip(tmp_path):
    h = h100_like(1024)
    path = h.save(tmp_path / "sub" / "sps.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["points"][0] == [1, pytest.approx(h(1))]
    back = SPSProfile.load(path)
    assert back.tokens == h.tokens and back.steps_per_s == h.steps_per_s
    assert back.identity() == h.identity() and back.source == h.source
    b = np.arange(1, 1100)
    assert np.array_equal(back(b), h(b))


def test_load_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"points": [[1, 2.0]]}))
    with pytest.raises(ValueError, match="format"):
        SPSProfile.load(bad)
    bad.write_text(json.dumps({"format": FORMAT, "points": [[1, 2.0]], "colour": "red"}))
    with pytest.raises(ValueError, match="unknown"):
        SPSProfile.load(bad)


def test_evaluate_sps_takes_any_curve():
    assert np.allclose(evaluate_sps(lambda b: 100.0 / b, np.array([1, 2, 4])), [100.0, 50.0, 25.0])
    p = SPSProfile.from_points([(1, 10.0), (3, 30.0)])
    assert np.allclose(evaluate_sps(p, np.array([1, 2, 3])), [10.0, 20.0, 30.0])
