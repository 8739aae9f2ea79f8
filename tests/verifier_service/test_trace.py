"""Engine traces: the recorder on hand-made step records, the file format, and recordings through
the real engine (oracle mock and untrained drafter) checked against the engine's own statistics
and replayed through the simulator; the ``dspark trace record`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _helpers import drafter_config, randomize
from _mocks import MockDrafter
from dspark.platform.config import EngineConfig, TargetConfig
from dspark.verifier_service.engine import StepRecord
from dspark.verifier_service.trace import Trace, TraceFormatError, TraceRecorder, load_trace, record_trace, save_trace


# ------------------------------------------------------------------------------ recorder and file
def _hand_trace() -> Trace:
    rec = TraceRecorder(3, ["a", "b", "c"])
    rec(StepRecord(("a", "b"), (3, 3), (3, 1), np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], dtype=np.float32), False))
    rec(StepRecord(("b", "a"), (0, 0), (0, 0), None, True))  # drafter failed: censored, NaN confidences
    rec(StepRecord(("b", "a", "c"), (3, 2, 3), (0, 2, 2), np.full((3, 3), 0.5, dtype=np.float32), False))
    rec(StepRecord(("b",), (1,), (0,), np.array([[0.2, 0.1, 0.1]], dtype=np.float32), False))  # clipped but rejected: known
    return rec.trace({"target": "t", "drafter": "d", "temperature": 0.0, "prompts": [{"id": x, "token_ids": [1]} for x in "abc"]})


def test_recorder_rows_and_known_mask():
    t = _hand_trace()
    assert t.step.tolist() == [0, 0, 1, 1, 2, 2, 2, 3]
    assert t.request.tolist() == [0, 1, 1, 0, 1, 0, 2, 1]
    assert t.verified.tolist() == [3, 3, 0, 0, 3, 2, 3, 1] and t.accepted.tolist() == [3, 1, 0, 0, 0, 2, 2, 0]
    # a = ℓ < γ (row 5: clipped and fully accepted; rows 2-3: fallback) is only a lower bound
    assert t.known.tolist() == [True, True, False, False, True, False, True, True]
    assert t.fallback.tolist() == [False, False, True, True, False, False, False, False]
    assert np.isnan(t.confidences[2:4]).all() and t.confidences[0].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert t.tau() == pytest.approx(np.mean([4, 2, 1, 3, 1])) and t.header["has_confidences"] and t.gamma == 3
    traj = t.trajectories()  # per request in step order: a: [3], b: [1, 0, 0], c: [2]
    assert traj.starts.tolist() == [0, 1, 4, 5] and traj.accepted.tolist() == [3, 1, 0, 0, 2]


def test_file_round_trip_and_format_errors(tmp_path):
    t = _hand_trace()
    path = save_trace(t, tmp_path / "sub" / "trace.bin")  # any suffix: the name is kept as given
    back = load_trace(path)
    assert back.header["format"] == "dspark-trace" and back.header["prompts"][2]["id"] == "c"
    for name in ("step", "request", "verified", "accepted", "fallback"):
        assert np.array_equal(getattr(back, name), getattr(t, name)) and getattr(back, name).dtype == getattr(t, name).dtype
    np.testing.assert_array_equal(back.confidences, t.confidences)
    no_head = Trace({**t.header, "has_confidences": False}, t.step, t.request, t.verified, t.accepted, t.fallback, None)
    assert load_trace(save_trace(no_head, tmp_path / "nohead.npz")).confidences is None

    with pytest.raises(TraceFormatError, match="does not exist"):
        load_trace(tmp_path / "missing.npz")
    for junk in (b"junk", b"PK\x03\x04 a broken zip", b""):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(TraceFormatError, match="not a trace file"):
            load_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", header=np.array(json.dumps({"format": "something"})))
    with pytest.raises(TraceFormatError, match="not a dspark trace"):
        load_trace(tmp_path / "other.npz")
    with pytest.raises(TraceFormatError, match="accepted <= verified"):
        Trace(t.header, t.step, t.request, t.verified, t.verified + 1, t.fallback, t.confidences)


# ------------------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    from dspark.platform.target.loading import load_target

    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


def _prompts(demo, n=4):
    from dspark.platform.training.evaluate import EvalConfig, load_prompts

    cfg = EvalConfig(num_prompts=n, prompt_min_tokens=8, prompt_max_tokens=24, demo_target={"max_corpus_mb": 0.6})
    return load_prompts(demo.tokenizer, "test", cfg)[1]


def _check_against_engine(trace: Trace, outputs: dict, gamma: int) -> None:
    """Per request, the recorded rows add up to the engine's own RequestStats."""
    ids = [f"{i}:{p['id']}" for i, p in enumerate(trace.header["prompts"])]
    assert sorted(ids) == sorted(outputs)
    for i, rid in enumerate(ids):
        st, rows = outputs[rid].stats, trace.request == i
        assert rows.sum() == st.steps and trace.verified[rows].sum() == st.drafted and trace.accepted[rows].sum() == st.accepted
        k = np.arange(1, gamma + 1)[None]
        assert (trace.verified[rows][:, None] >= k).sum(0).tolist() == list(st.proposed_at)
        assert (trace.accepted[rows][:, None] >= k).sum(0).tolist() == list(st.accepted_at)
        # whole-block verification: only a request's last step can be censored (clipped by max_tokens)
        assert trace.known[rows][:-1].all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_oracle_mock_trace_matches_engine_stats_and_replays(demo, temperature):
    from dspark.scheduler.simulator import PolicySpec, simulate

    prompts = _prompts(demo)
    mock = MockDrafter(demo.vocab_size, 4, seed=0, oracle=demo, corrupt=0.2)
    trace, outputs = record_trace(demo, mock, prompts, temperature=temperature, max_tokens=24,
                                  engine=EngineConfig(max_batch_size=3), seed=1, drafter_name="oracle mock")
    _check_against_engine(trace, outputs, 4)
    h = trace.header
    assert h["gamma"] == 4 and h["temperature"] == temperature and h["drafter"] == "oracle mock" and h["max_tokens"] == 24
    assert [p["token_ids"] for p in h["prompts"]] == [list(p.token_ids) for p in prompts]
    conf = trace.confidences
    drafted = ~np.isnan(conf).any(axis=1)  # a step where no request may verify a draft skips the draft pass
    assert conf.shape == (trace.num_rows, 4) and drafted.mean() > 0.8 and ((conf[drafted] > 0) & (conf[drafted] < 1)).all()
    assert (trace.verified[~drafted] == 0).all() and np.isnan(conf[~drafted]).all()
    assert (trace.step[1:] >= trace.step[:-1]).all() and trace.step.max() + 1 == len(set(trace.step.tolist()))
    if temperature == 0:  # the oracle drafts the target's own greedy tokens unless corrupted
        assert trace.tau() > 1.5
    # replaying whole-block verification reproduces the recorded τ; fixed 1 accepts min(a, 1)
    traj = trace.trajectories()
    assert traj.tau() == pytest.approx(trace.tau())
    sim = simulate(traj, lambda b: 10.0, PolicySpec("fixed"), concurrency=64, steps=300, seed=0)
    assert sim.tau == pytest.approx(trace.tau(), rel=0.03) and sim.mean_verify == 4
    sim1 = simulate(traj, lambda b: 10.0, PolicySpec("fixed", 1), concurrency=64, steps=300, seed=0)
    assert sim1.tau == pytest.approx(np.mean(np.minimum(traj.accepted, 1) + 1), rel=0.03)


def test_untrained_drafter_trace(demo, tmp_path):
    from dspark.drafter_service.registry import build_drafter

    torch.manual_seed(0)
    drafter = build_drafter(drafter_config("dspark-vanilla"), demo)
    randomize(drafter, 0)
    prompts = _prompts(demo, 3)
    run = dict(temperature=1.0, max_tokens=12, engine=EngineConfig(max_batch_size=2), seed=3)
    trace, outputs = record_trace(demo, drafter, prompts, **run)
    _check_against_engine(trace, outputs, drafter.block_size)
    assert trace.header["drafter"] == type(drafter).__name__ and trace.gamma == drafter.block_size
    assert trace.known.sum() > 0 and np.isfinite(trace.confidences[trace.known]).all()
    back = load_trace(save_trace(trace, tmp_path / "u.npz"))
    assert back.tau() == trace.tau() and back.trajectories().num_trajectories == trace.trajectories().num_trajectories
    # seeded: the same recording again gives the same rows
    again, _ = record_trace(demo, drafter, prompts, **run)
    assert np.array_equal(again.accepted, trace.accepted) and np.array_equal(again.confidences, trace.confidences)


# ------------------------------------------------------------------------------ CLI
def test_trace_record_cli_untrained_then_simulate(tiny_demo_target, tmp_path):
    from click.testing import CliRunner

    from dspark.scheduler.sim_cli import simulate_command, trace_group

    out = tmp_path / "trace.npz"
    base = ["--set", f"target.path={tiny_demo_target.path}", "--set", "demo_target.max_corpus_mb=0.6",
            "--set", "prompt_max_tokens=24", "--set", "engine.max_batch_size=3"]
    res = CliRunner().invoke(trace_group, ["record", "--untrained", "dspark", "--gamma", "3", "--num-prompts", "3",
                                           "--max-tokens", "8", "--temperature", "1", "--out", str(out), *base])
    assert res.exit_code == 0, res.output
    trace = load_trace(out)
    assert trace.gamma == 3 and len(trace.header["prompts"]) == 3 and trace.header["drafter"] == "untrained dspark"
    assert trace.header["temperature"] == 1.0 and "wrote" in res.output
    res = CliRunner().invoke(simulate_command, ["--trace", str(out), "--concurrency", "1,4", "--replicas", "1",
                                                "--policies", "off,fixed,prefix", "--steps", "5", "--min-request-steps", "0",
                                                "--no-write"])
    assert res.exit_code == 0, res.output
    assert "| 1 | 4 |" in res.output and "prefix tok/s" in res.output

    # user errors: one line, status 2
    for args, msg in [
        (["record", "--out", str(out)], "exactly one of --drafter DIR and --untrained KIND"),
        (["record", "--untrained", "dspark", "--drafter", str(tmp_path), "--out", str(out)], "exactly one of"),
        (["record", "--untrained", "medusa", "--out", str(out)], "unknown drafter kind 'medusa'"),
        (["record", "--drafter", str(tmp_path / "none"), "--out", str(out)], "does not exist"),
        (["record", "--untrained", "dspark", "--data", str(tmp_path / "p.jsonl"), "--out", str(out), *base], "does not exist"),
        (["record", "--untrained", "dspark", "--max-tokens", "600", "--num-prompts", "1", "--out", str(out), *base],
         "exceeds the context length"),
    ]:
        res = CliRunner().invoke(trace_group, args)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)
