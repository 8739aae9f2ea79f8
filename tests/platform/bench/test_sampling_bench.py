"""``dspark bench sampling``'s runner and report on the fixture demo target (a mock drafter), and its
input checks."""

from __future__ import annotations

from click.testing import CliRunner

from _mocks import MockDrafter
from dspark.platform.bench.sampling import noise_cost_line, noise_cost_ms, render_markdown, run_sampling_bench, section_body
from dspark.platform.cli import cli
from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import load_target


def test_runner_reports_both_modes_and_checks_seeded_outputs(tiny_demo_target):
    target = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    prompts = [target.tokenizer(t).input_ids for t in ("import os\n", "def f(x):\n", "class A:\n")]
    drafter = MockDrafter(target.vocab_size, 3, oracle=target, corrupt=0.2)
    calls = []
    rows = run_sampling_bench(target, drafter, prompts, temperatures=[0.7, 1.0], max_tokens=6, batch_size=2, repeats=2,
                              progress=calls.append)
    assert [(r.temperature, r.mode) for r in rows] == [(0.7, "seeded (matching)"), (0.7, "unseeded (rejection)"),
                                                       (1.0, "seeded (matching)"), (1.0, "unseeded (rejection)")]
    assert len(calls) == 2
    for r in rows:
        assert r.tau >= 1 and len(r.accept_at) == 3 and all(0 <= a <= 1 for a in r.accept_at) and r.tokens_per_s > 0
        assert r.identical == (3 if r.mode.startswith("seeded") else None)  # seeded = plain decoding with the seed
    table = render_markdown(rows)
    assert "| 0.7 | seeded (matching) |" in table and "3/3" in table
    keyed, drawn = noise_cost_ms(4, 101, repeats=2)
    assert keyed > 0 and drawn > 0
    line = noise_cost_line(4, 101)
    body = section_body("mock, γ = 3", 3, 12, 6, 2, 2, f"{table}\n\n{line}")
    assert "= 4 rows × V = 101" in line and table in body and "max_batch_size 2" in body and line in body


def test_bench_sampling_refuses_bad_temperatures(tiny_demo_target, tmp_path):
    for bad in ("0", "x", ",", "nan", "1,inf"):
        res = CliRunner().invoke(cli, ["bench", "sampling", "--drafter-path", str(tmp_path), "--temperatures", bad,
                                       "--set", f"target.path={tiny_demo_target.path}", "--no-write"])
        assert res.exit_code == 2 and "temperature" in res.output.lower(), res.output
