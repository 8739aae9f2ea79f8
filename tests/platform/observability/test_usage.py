"""The per-request acceptance in the response's ``usage`` (opt-in ``dspark: {acceptance: true}``):
mean accepted length and acceptance per block position, from the request's own statistics."""

from __future__ import annotations

import pytest

from dspark.platform.contracts import RequestOutput, RequestStats
from dspark.platform.serving.openai_api import usage


def test_usage_reports_mean_accepted_length_and_per_position_acceptance():
    # 4 verify steps verifying 3, 3, 2, 0 drafts and accepting 3, 1, 0, 0
    stats = RequestStats(steps=4, drafted=8, accepted=4, proposed_at=(3, 3, 2), accepted_at=(2, 1, 1))
    out = RequestOutput("r", (), tuple(range(9)), True, "length", stats)
    d = usage(5, out, acceptance=True)["dspark"]
    assert d["mean_accepted_length"] == pytest.approx(1.0)
    assert d["acceptance_rate"] == pytest.approx(0.5)
    assert d["drafted_at"] == [3, 3, 2] and d["accepted_at"] == [2, 1, 1]
    assert d["acceptance_rate_at"] == pytest.approx([2 / 3, 1 / 3, 0.5])


def test_usage_without_speculation_or_opt_in():
    out = RequestOutput("r", (), (1, 2), True, "stop", RequestStats(steps=0, proposed_at=(0, 0), accepted_at=(0, 0)))
    d = usage(3, out, acceptance=True)["dspark"]
    assert d["mean_accepted_length"] is None and d["acceptance_rate_at"] == [None, None]
    assert "dspark" not in usage(3, out, acceptance=False)
