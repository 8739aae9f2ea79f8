"""The pure parts of ``dspark bench serve``: summarising request records, per-step figures from two
replica stats snapshots, the greedy comparison and the report (the live path runs in
tests/platform/demo/test_demo_run.py against a real Serve app)."""

from __future__ import annotations

import pytest

from dspark.platform.bench.load import RequestRecord, percentile, summarize
from dspark.platform.bench.serve import ServeBenchRow, _step_figures, render_markdown
from dspark.platform.bench.serve_cli import parse_url


def rec(i, start, ttft, end, gaps, tokens, error=None, tps=None):
    return RequestRecord(i, start=start, ttft=ttft, end=end, gaps=list(gaps), tokens=tokens, error=error,
                         acceptance={"tokens_per_step": tps} if tps else None)


def test_percentile_interpolates_and_handles_no_data():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_summarize_counts_failures_and_measures_what_users_see():
    records = [rec(0, 0.0, 0.1, 1.1, [0.2] * 5, 11, tps=2.0), rec(1, 0.5, 0.3, 2.5, [0.4] * 5, 11, tps=4.0),
               rec(2, 0.0, None, None, [], 0, error="APIConnectionError: boom")]
    s = summarize(records, seconds=2.5)
    assert (s.requests, s.failed, s.tokens) == (3, 1, 22)
    assert s.aggregate_tps == pytest.approx(22 / 2.5)
    assert s.ttft_p50 == pytest.approx(0.2)  # of 0.1 and 0.3
    assert s.per_user_tps == pytest.approx((11 / 1.0 + 11 / 1.7) / 2)  # tokens / (latency - TTFT)
    assert s.itl_p50 == pytest.approx(0.3) and s.itl_p99 == pytest.approx(0.4)
    assert s.tpot_mean == pytest.approx((1.0 / 10 + 1.7 / 10) / 2)
    assert s.tokens_per_step == pytest.approx(3.0)


def test_step_figures_from_two_snapshots():
    before = {"session": "a", "steps": 10, "draft_s": 1.0, "verify_s": 2.0, "skipped_draft_steps": 2,
              "fallback_steps": 0, "draft_calls": 8, "draft_sent_bytes": 800, "draft_received_bytes": 80,
              "topology": "disaggregated"}
    after = dict(before, steps=30, draft_s=2.5, verify_s=4.0, skipped_draft_steps=7, draft_calls=23,
                 draft_sent_bytes=2300, draft_received_bytes=380)
    f = _step_figures(before, after)
    assert f["step_ms"] == pytest.approx(1e3 * 3.5 / 20)
    assert f["drafted"] == pytest.approx(15 / 20) and f["draft_ms"] == pytest.approx(1e3 * 1.5 / 15)
    assert f["sent_bytes"] == pytest.approx(100) and f["received_bytes"] == pytest.approx(20)
    # the engine's own count of draft passes wins over the estimate (a budget of 0 skips without counting)
    counted = _step_figures(dict(before, draft_steps=5), dict(after, draft_steps=15))
    assert counted["drafted"] == pytest.approx(10 / 20) and counted["draft_ms"] == pytest.approx(1e3 * 1.5 / 10)
    assert _step_figures(before, dict(after, session="b"))["step_ms"] is None  # another replica answered
    assert _step_figures(None, after)["step_ms"] is None


def test_report_states_ratios_and_failures():
    s = summarize([rec(0, 0.0, 0.1, 1.1, [0.1], 10)], 1.0)
    fast = summarize([rec(0, 0.0, 0.1, 0.6, [0.1], 10)], 0.5)
    none = dict(step_ms=None, draft_ms=None, drafted=None, sent_bytes=None, received_bytes=None, fallback_steps=None)
    rows = [ServeBenchRow("plain", 4, s, **none, mismatches=None),
            ServeBenchRow("colocated", 4, fast, **none, mismatches=0),
            ServeBenchRow("disaggregated", 4, s, **none, mismatches=1, first_error="HTTP 503")]
    md = render_markdown(rows, max_tokens=10)
    assert "colocated 2.00× plain" in md and "disaggregated 1.00× plain" in md
    assert "first error: HTTP 503" in md


def test_parse_url():
    assert parse_url("plain=http://h:1/p/v1/") == ("plain", "http://h:1/p/v1")
    assert parse_url("http://h:1/x") == ("x", "http://h:1/x/v1")
    with pytest.raises(Exception, match="LABEL="):
        parse_url("ftp://h")
