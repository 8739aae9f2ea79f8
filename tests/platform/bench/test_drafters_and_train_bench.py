"""``dspark bench drafters`` (τ table and DSpark's ratios from eval.json files) and the
throughput arithmetic of ``dspark bench train``; ``dspark train`` refuses a missing data set."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from dspark.platform.bench.train import TrainBenchRow, _median_rows
from dspark.platform.bench.train import render_markdown as train_table
from dspark.platform.cli import cli


def write_eval(d, kind, taus):
    d.mkdir(parents=True)
    runs = [{"data": "test", "temperature": t, "tau": tau} for t, tau in taus.items()]
    (d / "eval.json").write_text(json.dumps({"kind": kind, "gamma": 7, "runs": runs}))
    return d


def test_bench_drafters_table_and_ratios(tmp_path):
    a = write_eval(tmp_path / "eval-a", "dspark", {0.0: 3.0, 1.0: 2.6})
    b = write_eval(tmp_path / "eval-b", "eagle3", {0.0: 2.0, 1.0: 2.0})
    out = tmp_path / "B.md"
    res = CliRunner().invoke(cli, ["bench", "drafters", str(a), str(b / "eval.json"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "| eval-a | dspark | 7 | 3.000 | 2.600 |" in text
    assert "| eval-a / eval-b | 1.500 | 1.300 |" in text
    assert f"- command: `dspark bench drafters {a} {b / 'eval.json'} --output {out}`" in text  # as typed


def test_bench_drafters_missing_eval(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "drafters", str(tmp_path), "--no-write"])
    assert res.exit_code != 0 and "eval.json" in str(res.exception or res.output)


def test_train_throughput_median_and_efficiency(tmp_path):
    f = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "tokens_per_s": tps, "seconds": sec} for s, tps, sec in
            [(1, 10.0, 9.0), (2, 100.0, 1.0), (3, 120.0, 0.8), (4, 80.0, 1.2)]]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert _median_rows(f, warmup=1) == (100.0, 1.0, 3)  # step 1 (start-up) left out
    t = train_table([TrainBenchRow(1, 100.0, 1.0, 3), TrainBenchRow(2, 150.0, 0.7, 3)])
    assert "| 2 | 150 | 0.70 | 75% | 3 |" in t and "| 1 | 100 | 1.00 | 100% | 3 |" in t


def test_train_refuses_a_missing_data_set(tmp_path, tiny_demo_target):
    yaml = Path(__file__).resolve().parents[3] / "clusters" / "train-demo.yaml"
    res = CliRunner().invoke(cli, ["train", str(yaml), "--set", f"target.path={tiny_demo_target.path}",
                                   "--set", f"data.path={tmp_path / 'none'}", "--set", "data.generate_config=null",
                                   "--set", f"output_dir={tmp_path}"])
    assert res.exit_code == 2 and "no complete data set" in res.output
