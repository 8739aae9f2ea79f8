"""``dspark bench policies`` end to end on the fixture demo target, its errors and its pure parts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dspark.platform.bench.policies import (
    PolicyBenchRow,
    fixed_lengths,
    goal_checks,
    policy_labels,
    profile_token_counts,
    render_markdown,
)
from dspark.platform.cli import cli
from dspark.scheduler.sps import SPSProfile


def _base(target) -> list[str]:
    return ["bench", "policies", "--set", f"target.path={target.path}", "--set", "drafter.block_size=3"]


def test_bench_policies_cli(tiny_demo_target, tmp_path):
    out, png = tmp_path / "BENCH.md", tmp_path / "plots" / "policies.png"
    res = CliRunner().invoke(cli, [
        *_base(tiny_demo_target), "--untrained", "dspark", "--concurrency", "1,2", "--max-tokens", "5",
        "--prompt-tokens", "12", "--repeats", "1", "--output", str(out), "--plot", str(png),
    ])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    for c in (1, 2):  # every policy at every concurrency; fixed lengths default to 2, 4, γ (those <= γ = 3)
        for policy in ("off", "fixed 2", "fixed 3", "prefix", "async"):
            assert f"| {c} | {policy} |" in text, (c, policy)
        assert f"- C = {c}: best scheduled" in text
    assert "| 1 | fixed 4 |" not in text
    assert "Goal (best of prefix/async" in text and "concurrencies." in text
    assert "`dspark bench policies --set" in text and "--concurrency 1,2" in text and "--untrained dspark" in text
    assert "![policy throughput](plots/policies.png)" in text
    assert png.stat().st_size > 1000
    sps = SPSProfile.load(png.with_suffix(".sps.json"))  # measured on this engine, beside the plot
    assert sps.source == "measured" and sps.max_batch == 2 and sps.tokens == (1, 2, 3, 4, 8)


def test_bench_policies_refuses_bad_input(tiny_demo_target, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, [*_base(tiny_demo_target), "--untrained", "nope", "--no-write"])
    assert res.exit_code == 2 and "unknown drafter kind" in res.output
    res = runner.invoke(cli, [*_base(tiny_demo_target), "--no-write"])
    assert res.exit_code == 2 and "exactly one of --drafter-path" in res.output
    res = runner.invoke(cli, [*_base(tiny_demo_target), "--untrained", "dspark", "--fixed", "2,5", "--no-write"])
    assert res.exit_code == 2 and "must be in 1..3" in res.output
    res = runner.invoke(cli, [*_base(tiny_demo_target), "--drafter-path", str(tmp_path / "none"), "--no-write"])
    assert res.exit_code == 2 and "not a drafter checkpoint" in res.output


def test_fixed_lengths_and_labels():
    assert fixed_lengths(7) == [2, 4, 7]
    assert fixed_lengths(3) == [2, 3]
    assert fixed_lengths(1) == [1]
    assert fixed_lengths(7, [4, 1, 4]) == [4, 1]
    with pytest.raises(ValueError):
        fixed_lengths(3, [4])
    assert policy_labels([2, 7]) == ["off", "fixed 2", "fixed 7", "prefix", "async"]


def test_profile_token_counts_cover_every_batch():
    assert profile_token_counts(3, 2) == [1, 2, 3, 6]
    counts = profile_token_counts(8, 32)
    assert counts[0] == 1 and counts[-1] == 256 and 24 in counts and len(counts) == 8 + 31


def _row(policy: str, c: int, seconds: float) -> PolicyBenchRow:
    return PolicyBenchRow(policy, c, 100, seconds, 1.5, 2.0, 3.0, 1.0, 0)


def test_goal_check_reports_either_way():
    rows = [_row("off", 1, 2.0), _row("fixed 2", 1, 1.0), _row("prefix", 1, 0.9), _row("async", 1, 1.2),
            _row("off", 4, 1.0), _row("fixed 2", 4, 1.5), _row("prefix", 4, 1.1), _row("async", 4, 1.05)]
    checks = goal_checks(rows)
    assert [(g.concurrency, g.scheduled.policy, g.other.policy, g.holds) for g in checks] == [
        (1, "prefix", "fixed 2", True), (4, "async", "off", False)]
    text = render_markdown(rows)
    assert "| 1 | fixed 2 | 100.0 | 2.00× |" in text and "| 4 | off | 100.0 | 1.00× |" in text
    assert "met at 1 of 2 concurrencies" in text and "**below** off" in text
