"""Drafter evaluation: the aggregation functions on hand-computed cases, and end-to-end runs through
the real engine whose τ and accept@k must equal the engine's own per-request statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _helpers import drafter_config, randomize
from _mocks import MockDrafter
from dspark.platform.config import EngineConfig, TargetConfig
from dspark.platform.training.evaluate import (
    EvalConfig,
    EvalResult,
    StepCollector,
    accept_rate_at,
    conditional_accept_at,
    evaluate_drafter,
    load_prompts,
    mean_confidence_at,
    mean_survival_at,
    plot_positions,
    proposed_at,
    run_prompts,
    summarize,
    tau,
)
from dspark.verifier_service.engine import StepRecord



# ------------------------------------------------------------------------------ pure aggregation
L = np.array([3, 3, 2, 0])
A = np.array([3, 1, 0, 0])
C = np.array([[0.9, 0.8, 0.5], [0.6, 0.4, 0.2], [0.3, 0.7, 0.1], [0.5, 0.5, 0.5]])


def test_tau_and_prefix_survival_by_hand():
    assert tau(A) == pytest.approx((4 + 2 + 1 + 1) / 4)
    assert proposed_at(L, 3).tolist() == [3, 3, 2]
    # k=1: rows ℓ≥1 = {0,1,2}, a≥1 in {0,1}; k=2: {0,1,2} / {0}; k=3: {0,1} / {0}
    np.testing.assert_allclose(accept_rate_at(L, A, 3), [2 / 3, 1 / 3, 1 / 2])


def test_conditional_acceptance_by_hand():
    # k=1: ℓ≥1 & a≥0 = {0,1,2} → a≥1 {0,1}; k=2: ℓ≥2 & a≥1 = {0,1} → {0}; k=3: ℓ≥3 & a≥2 = {0} → {0}
    np.testing.assert_allclose(conditional_accept_at(L, A, 3), [2 / 3, 1 / 2, 1.0])


def test_mean_confidence_and_survival_by_hand():
    # c_k over the conditional rows: k=1 {0,1,2}, k=2 {0,1}, k=3 {0}
    np.testing.assert_allclose(mean_confidence_at(C, L, A), [(0.9 + 0.6 + 0.3) / 3, (0.8 + 0.4) / 2, 0.5])
    # Π c_j over ℓ ≥ k: k=1 {0,1,2}, k=2 {0,1,2}, k=3 {0,1}
    np.testing.assert_allclose(
        mean_survival_at(C, L), [(0.9 + 0.6 + 0.3) / 3, (0.72 + 0.24 + 0.21) / 3, (0.36 + 0.048) / 2]
    )


def test_positions_nobody_reached_are_nan():
    out = accept_rate_at(np.array([1, 1]), np.array([1, 0]), 3)
    assert out[0] == 0.5 and np.isnan(out[1:]).all()
    assert np.isnan(conditional_accept_at(np.array([2]), np.array([0]), 2)[1])  # a ≥ 1 never happened
    assert np.isnan(tau(np.array([], dtype=int)))


def test_collector_keeps_fallback_rows_without_confidences():
    col = StepCollector(2)
    col(StepRecord(("a", "b"), (2, 1), (1, 0), np.array([[0.9, 0.5], [0.2, 0.1]], dtype=np.float32), False))
    col(StepRecord(("a", "b"), (0, 0), (0, 0), None, True))
    t = col.table()
    assert t.lengths.tolist() == [2, 1, 0, 0] and t.accepted.tolist() == [1, 0, 0, 0]
    assert t.fallback.tolist() == [False, False, True, True]
    assert t.confidences.shape == (4, 2) and np.isnan(t.confidences[2:]).all()
    np.testing.assert_allclose(t.confidences[:2], [[0.9, 0.5], [0.2, 0.1]], rtol=1e-6)
    m = summarize(t, data="x", temperature=0.0, prompts=2, tokens=7)
    assert m.steps == 4 and m.fallback_steps == 2 and m.drafted == 3 and m.accepted == 1
    assert m.tau == pytest.approx(5 / 4)
    np.testing.assert_allclose(m.mean_confidence_at, [(0.9 + 0.2) / 2, 0.5], rtol=1e-6)
    assert len(m.ece_at) == len(m.auroc_at) == 2


def test_collector_without_confidence_head():
    col = StepCollector(3)
    col(StepRecord(("a",), (3,), (2,), None, False))
    m = summarize(col.table(), data="x", temperature=1.0, prompts=1, tokens=3)
    assert m.mean_confidence_at == [] and m.ece_at == [] and m.tau == 3.0


def test_config_is_strict():
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(bogus=1)
    with pytest.raises(ValueError, match="distinct"):
        EvalConfig(temperatures=(1.0, 1.0))
    with pytest.raises(ValueError, match="t_min"):
        EvalConfig(calibration={"t_min": 5.0, "t_max": 1.0})
    with pytest.raises(ValueError, match="prompt_min_tokens"):
        EvalConfig(prompt_min_tokens=50, prompt_max_tokens=10)


# ------------------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    from dspark.platform.target.loading import load_target

    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


def _cfg(**over) -> EvalConfig:
    base = dict(num_prompts=4, max_tokens=20, prompt_min_tokens=8, prompt_max_tokens=24,
                demo_target={"max_corpus_mb": 0.6}, engine={"max_batch_size": 3})
    base.update(over)
    return EvalConfig(**base)


def _pooled_stats(outputs) -> tuple[float, list[float], int]:
    """τ, accept@k and steps pooled over the engine's own RequestStats."""
    steps = sum(o.stats.steps for o in outputs.values())
    acc = sum(o.stats.accepted for o in outputs.values())
    g = max(len(o.stats.proposed_at) for o in outputs.values())
    prop = np.zeros(g)
    hit = np.zeros(g)
    for o in outputs.values():
        prop[: len(o.stats.proposed_at)] += o.stats.proposed_at
        hit[: len(o.stats.accepted_at)] += o.stats.accepted_at
    with np.errstate(invalid="ignore"):
        return (acc + steps) / steps, (hit / prop).tolist(), steps


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_oracle_mock_matches_engine_stats(demo, temperature):
    _, prompts = load_prompts(demo.tokenizer, "test", _cfg())
    assert len(prompts) >= 3
    mock = MockDrafter(demo.vocab_size, 4, seed=0, oracle=demo, corrupt=0.2)
    table, outputs = run_prompts(demo, mock, prompts, temperature=temperature, max_tokens=20,
                                 engine=EngineConfig(max_batch_size=3), seed=1)
    m = summarize(table, data="test", temperature=temperature, prompts=len(prompts),
                  tokens=sum(len(o.token_ids) for o in outputs.values()))
    ref_tau, ref_acc, ref_steps = _pooled_stats(outputs)
    assert m.steps == ref_steps and m.tau == pytest.approx(ref_tau)
    np.testing.assert_allclose(m.accept_rate_at, ref_acc, rtol=1e-12)
    # greedy: the oracle's drafts are the target's own tokens unless corrupted; sampled: the tiny
    # target's distributions are flat, so only some survive min(1, p_t/p_d)
    assert m.tau > 1.5 if temperature == 0 else m.accepted > 0
    assert 0 < m.tokens <= len(prompts) * 20
    assert len(m.mean_confidence_at) == 4 and all(0.0 <= c <= 1.0 for c in m.mean_confidence_at if not np.isnan(c))


def test_untrained_drafter_on_two_datasets(demo, tmp_path):
    from dspark.drafter_service.registry import build_drafter

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": s}) for s in ["def add(a, b):\n", "import os\n\nclass A:\n"]) + "\n")
    cfg = _cfg(data=("test", str(jsonl)), temperatures=(0.0, 1.0))
    torch.manual_seed(0)
    drafter = build_drafter(drafter_config("dspark-vanilla"), demo)
    randomize(drafter, 0)
    datasets = dict(load_prompts(demo.tokenizer, spec, cfg) for spec in cfg.data)
    assert list(datasets) == ["test", "p.jsonl"] and len(datasets["p.jsonl"]) == 2
    result = evaluate_drafter(demo, drafter, datasets, temperatures=cfg.temperatures, max_tokens=12,
                              engine=cfg.engine, seed=3, name="untrained")
    assert [(r.data, r.temperature) for r in result.runs] == [("test", 0.0), ("test", 1.0), ("p.jsonl", 0.0), ("p.jsonl", 1.0)]
    assert result.gamma == 4 and result.kind == "dspark" and result.confidence_temperature == [1.0] * 4
    # the same run again, compared with the engine's own statistics
    table, outputs = run_prompts(demo, drafter, datasets["p.jsonl"], temperature=1.0, max_tokens=12, engine=cfg.engine, seed=3)
    ref_tau, ref_acc, _ = _pooled_stats(outputs)
    r = result.runs[3]
    assert r.tau == pytest.approx(ref_tau)
    np.testing.assert_allclose(r.accept_rate_at, ref_acc, equal_nan=True)
    assert r.steps > 0 and r.drafted > 0 and len(r.mean_confidence_at) == 4

    # JSON round trip (NaN ↔ null), markdown, plot
    path = result.save_json(tmp_path / "eval.json")
    raw = json.loads(path.read_text())  # strict JSON: no NaN literals
    back = EvalResult.from_dict(raw)
    assert back.runs[3].tau == pytest.approx(r.tau) and back.gamma == 4
    md = result.markdown()
    assert "| p.jsonl | 1 |" in md and "conditional acceptance" in md and "k=4" in md
    png = plot_positions(result, tmp_path / "pos.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_prompt_file_is_a_user_error(demo, tmp_path):
    from dspark.platform.training.prompts import PromptSourceError

    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompts(demo.tokenizer, str(tmp_path / "nope.jsonl"), _cfg())


# ------------------------------------------------------------------------------ CLI
def test_eval_cli_writes_results_and_benchmark_section(demo, tiny_demo_target, tmp_path):
    from click.testing import CliRunner

    from dspark.drafter_service.checkpoint import save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.training.eval_cli import eval_command

    torch.manual_seed(0)
    ckpt = save_drafter(build_drafter(drafter_config("dspark-vanilla"), demo), tmp_path / "drafter")
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"def g{i}(y):\n"}) for i in range(3)) + "\n")
    bench = tmp_path / "BENCHMARKS.md"
    res = CliRunner().invoke(eval_command, [
        "--drafter", str(ckpt), "--data", str(data), "--temperatures", "0,1", "--max-tokens", "8",
        "--set", f"target.path={tiny_demo_target.path}", "--output-dir", str(tmp_path / "out"), "--benchmarks", str(bench),
    ])
    assert res.exit_code == 0, res.output
    raw = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [(r["data"], r["temperature"]) for r in raw["runs"]] == [("code.jsonl", 0.0), ("code.jsonl", 1.0)]
    assert all(r["prompts"] == 3 and r["steps"] > 0 and r["tau"] >= 1.0 for r in raw["runs"])
    assert (tmp_path / "out" / "eval_positions.png").read_bytes()[:4] == b"\x89PNG"
    text = bench.read_text()
    # a checkpoint directory named "drafter" (a training run's) is labelled by its run directory
    assert f"<!-- bench:eval-{tmp_path.name} -->" in text and "| code.jsonl | 0 |" in text and "out/eval_positions.png" in text
    # a prompt file that is not there, and a prompt too long for the context: one line, status 2
    res = CliRunner().invoke(eval_command, ["--drafter", str(ckpt), "--data", str(tmp_path / "nope.jsonl"),
                                            "--set", f"target.path={tiny_demo_target.path}"])
    assert res.exit_code == 2 and "nope.jsonl does not exist" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(eval_command, ["--drafter", str(ckpt), "--data", str(data), "--max-tokens", "600",
                                            "--set", f"target.path={tiny_demo_target.path}"])
    assert res.exit_code == 2 and "exceeds the context length" in res.output


def test_eval_cli_user_errors(tmp_path):
    from click.testing import CliRunner

    from dspark.platform.training.eval_cli import eval_command

    runner = CliRunner()
    res = runner.invoke(eval_command, ["--drafter", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "error:" in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(eval_command, ["--drafter", str(tmp_path), "--temperatures", "zero"])
    assert res.exit_code == 2 and "comma-separated numbers" in res.output
    res = runner.invoke(eval_command, ["--drafter", str(tmp_path), "--temperatures", "1,1"])
    assert res.exit_code == 2 and "distinct" in res.output
