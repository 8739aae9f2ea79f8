"""Cross-component records: validation on construction, τ and accept@k, no tensors inside."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dspark.platform.contracts import GenerationRequest, RequestOutput, RequestStats, SamplingParams, assert_no_tensors


@pytest.mark.parametrize("kw,msg", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=-3), "seed"),
    (dict(stop=("",)), "stop"),
])
def test_sampling_params_refuse_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as e:
        SamplingParams(max_tokens=0, top_p=2.0)
    assert "max_tokens" in str(e.value) and "top_p" in str(e.value)


def test_records_are_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]
    assert p.greedy and not SamplingParams(temperature=0.7).greedy


def test_request_validation():
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest("a", ())
    with pytest.raises(ValueError, match="non-negative"):
        GenerationRequest("a", (1, -2))
    GenerationRequest("a", (1, 2))


def test_tau_and_accept_rates():
    s = RequestStats(steps=4, drafted=12, accepted=6, proposed_at=(4, 4, 4), accepted_at=(3, 2, 1))
    assert s.tau == pytest.approx((6 + 4) / 4)
    assert s.accept_rate_at() == pytest.approx([0.75, 0.5, 0.25])
    assert RequestStats().tau == 0.0
    assert math.isnan(RequestStats(proposed_at=(0,), accepted_at=(0,)).accept_rate_at()[0])


def test_assert_no_tensors():
    out = RequestOutput("a", (1,), (1, 2), False, None, RequestStats())
    assert_no_tensors(out)
    with pytest.raises(TypeError, match="Tensor"):
        assert_no_tensors({"x": [1, (torch.zeros(2),)]})
