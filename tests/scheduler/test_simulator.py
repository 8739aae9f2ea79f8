"""Scheduling simulator: trajectories, goodput arithmetic on hand-made traces and SPS curves,
determinism, the report, and the ``dspark simulate`` command (no torch anywhere here)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from dspark.scheduler.simulator import (
    PolicySpec,
    SimulationError,
    Trajectories,
    build_policy,
    default_policies,
    load_sps,
    parse_policies,
    plot,
    render_markdown,
    run_grid,
    simulate,
    simulate_replica,
    spread,
)


def constant(gamma: int, a: int, rows: int = 10, trajectories: int = 3, conf: float = 0.9) -> Trajectories:
    """Every step of every request accepts exactly ``a`` of its γ drafts."""
    return Trajectories.from_lists(gamma, [[a] * rows] * trajectories, [np.full((rows, gamma), conf)] * trajectories)


def random_trace(gamma: int = 6, n: int = 40, seed: int = 0) -> Trajectories:
    """Requests whose per-step acceptance is geometric-like (each draft survives with prob. q_r)."""
    rng = np.random.default_rng(seed)
    acc, conf = [], []
    for _ in range(n):
        steps, q = int(rng.integers(3, 30)), rng.uniform(0.3, 0.9)
        survive = rng.random((steps, gamma)) < q
        acc.append(np.cumprod(survive, axis=1).sum(axis=1))
        conf.append(np.clip(q + rng.normal(0, 0.1, (steps, gamma)), 0.01, 0.99))
    return Trajectories.from_lists(gamma, acc, conf)


def flat(b: int) -> float:  # memory-bound: a step costs the same whatever its size
    return 50.0


def steep(b: int) -> float:  # compute-bound: a step's time is proportional to its tokens
    return 4000.0 / b


def test_trajectories_group_known_rows_per_request_in_step_order():
    request = np.array([1, 0, 1, 0, 2, 1])
    step = np.array([5, 1, 2, 3, 4, 9])
    accepted = np.array([10, 20, 30, 40, 50, 60])
    known = np.array([True, True, True, True, False, True])  # request 2 has no known row
    conf = np.arange(12, dtype=float).reshape(6, 2)
    t = Trajectories.from_rows(request, step, accepted % 3, conf, known, gamma=2)
    assert t.num_trajectories == 2 and t.starts.tolist() == [0, 2, 5]
    assert t.accepted.tolist() == [20 % 3, 40 % 3, 30 % 3, 10 % 3, 60 % 3]  # request 0 (steps 1, 3), request 1 (2, 5, 9)
    assert t.confidences[:, 0].tolist() == [2, 6, 4, 0, 10]
    with pytest.raises(SimulationError, match="no usable rows"):
        Trajectories.from_rows(request, step, accepted, conf, np.zeros(6, bool), gamma=2)
    with pytest.raises(SimulationError, match=r"\[0, γ = 2\]"):
        Trajectories.from_lists(2, [[3]])


def test_spread_and_policy_parsing():
    assert spread(10, 4) == [3, 3, 2, 2] and spread(1, 3) == [1, 0, 0] and sum(spread(1024, 8)) == 1024
    specs = parse_policies("off, fixed:2,fixed,threshold:0.3,threshold", gamma=4)
    assert [s.label for s in specs] == ["off", "fixed 2", "fixed γ", "threshold 0.3", "threshold 0.5"]
    for bad, msg in [("fast", "unknown policy"), ("fixed:5", "0..4"), ("threshold:2", r"\[0, 1\]"),
                     ("off:1", "takes no argument"), ("fixed:x", "bad argument"), ("", "at least one"),
                     ("off,off", "named twice")]:
        with pytest.raises(SimulationError, match=msg):
            parse_policies(bad, gamma=4)
    labels = [s.label for s in default_policies(7)]
    assert labels[:5] == ["off", "fixed 2", "fixed 4", "fixed γ", "threshold 0.5"]
    assert [s.label for s in default_policies(3)][:3] == ["off", "fixed 2", "fixed γ"]


@pytest.mark.parametrize("policy,expected", [
    # C = 2 requests, γ = 4, every step accepts a = 2 of the drafts.
    # flat SPS (50 steps/s): tokens per step 2·(min(2, ℓ) + 1)
    (("off", flat), 2 * 1 * 50), (("fixed:1", flat), 2 * 2 * 50), (("fixed", flat), 2 * 3 * 50),
    # steep SPS (4000 / B steps/s, B = 2·(1 + ℓ)): off 2·4000/2, fixed 1: 4·4000/4, fixed γ: 6·4000/10
    (("off", steep), 4000.0), (("fixed:1", steep), 4000.0), (("fixed", steep), 2400.0),
])
def test_goodput_by_hand(policy, expected):
    name, sps = policy
    traj = constant(gamma=4, a=2)
    r = simulate(traj, sps, parse_policies(name, 4)[0], concurrency=2, steps=37, min_request_steps=0)
    assert r.steps == 37
    assert r.goodput == pytest.approx(expected)
    ell = {"off": 0, "fixed:1": 1, "fixed": 4}[name]
    assert r.tau == pytest.approx(min(2, ell) + 1) and r.mean_verify == ell and r.mean_batch == 2 * (1 + ell)
    assert r.step_ms == pytest.approx(1e3 / sps(2 * (1 + ell))) and r.per_request == pytest.approx(expected / 2)


def test_flat_curve_favours_long_verification_and_steep_curve_short():
    traj = random_trace()
    specs = parse_policies("off,fixed:1,fixed:3,fixed", traj.gamma)
    for sps, order in ((flat, ["fixed γ", "fixed 3", "fixed 1", "off"]), (steep, ["off", "fixed 1", "fixed 3", "fixed γ"])):
        res = run_grid(traj, sps, specs, concurrency=[16], replicas=[1], steps=100, min_request_steps=0, seed=1)
        ranked = [r.policy for r in sorted(res, key=lambda r: -r.goodput)]
        assert ranked == order, (sps.__name__, [(r.policy, round(r.goodput)) for r in res])


def test_fixed_gamma_reproduces_the_trace_tau_and_threshold_cuts_by_confidence():
    traj = random_trace(seed=3)
    r = simulate(traj, flat, PolicySpec("fixed"), concurrency=64, steps=300, seed=0)
    assert r.tau == pytest.approx(traj.tau(), rel=0.02)
    assert simulate(traj, flat, PolicySpec("fixed", 2), concurrency=64, steps=300).tau == pytest.approx(traj.tau(2), rel=0.02)
    # threshold: confidences 0.9, 0.9, 0.2, 0.9 → ℓ = 2 for every request
    conf = np.tile([0.9, 0.9, 0.2, 0.9], (5, 1))
    t = Trajectories.from_lists(4, [[4] * 5, [1] * 5], [conf, conf])
    r = simulate(t, flat, PolicySpec("threshold", 0.5), concurrency=3, steps=20)
    assert r.mean_verify == 2 and 1 + 1 <= r.tau <= 2 + 1


def test_prefix_and_async_follow_the_curve():
    """Algorithm 1 on a flat curve admits every draft with positive survival (Θ = τ·const keeps
    rising); on SPS ∝ 1/B admitting a draft of survival a raises Θ only if a > τ/B = 1: never."""
    traj = random_trace(gamma=5)
    every = simulate(traj, flat, PolicySpec("fixed"), concurrency=8, steps=40, min_request_steps=0)
    none = simulate(traj, steep, PolicySpec("off"), concurrency=8, steps=40, min_request_steps=0)
    for name in ("prefix", "async"):
        assert simulate(traj, flat, PolicySpec(name), concurrency=8, steps=40, min_request_steps=0) == replace(every, policy=name)
        # only the first step drafts (nothing recorded yet); the gate skips every later draft pass
        assert simulate(traj, steep, PolicySpec(name), concurrency=8, steps=40, min_request_steps=0) == replace(
            none, policy=name, drafted=1 / 40)


def test_draft_cost_is_charged_and_weighed():
    """A drafting step costs d + 1/SPS(B). Fixed γ pays d on every step; off never does; the
    scheduled policies stop drafting when d is large enough that drafting cannot pay."""
    from dspark.scheduler.simulator import without_draft_cost
    from dspark.scheduler.sps import SPSProfile

    traj = random_trace(gamma=5)
    prof = SPSProfile.from_points([(1, 100.0), (4096, 100.0)], draft_points=((1, 0.002), (64, 0.002)))
    free = without_draft_cost(prof)
    fixed, fixed_free = (simulate(traj, p, PolicySpec("fixed"), concurrency=8, steps=40, min_request_steps=0) for p in (prof, free))
    assert fixed.tau == fixed_free.tau and fixed.step_ms == pytest.approx(fixed_free.step_ms + 2.0)
    assert fixed.goodput == pytest.approx(fixed_free.goodput * 10 / 12)
    off = simulate(traj, prof, PolicySpec("off"), concurrency=8, steps=40, min_request_steps=0)
    assert off.drafted == 0 and off.step_ms == pytest.approx(10.0)
    costly = SPSProfile.from_points([(1, 100.0), (4096, 100.0)], draft_points=((1, 0.05),))  # 50 ms per draft pass
    for name in ("prefix", "async"):
        r = simulate(traj, costly, PolicySpec(name), concurrency=8, steps=200, min_request_steps=0, policy_params={"refresh": 0})
        assert r.drafted == 1 / 200 and r.goodput > 0.97 * off.goodput  # one exploratory pass, then plain decoding
        assert simulate(traj, prof, PolicySpec(name), concurrency=8, steps=40, min_request_steps=0).drafted == 1.0
    with pytest.raises(SimulationError, match="unknown policy parameters"):
        simulate(traj, prof, PolicySpec("async"), concurrency=2, policy_params={"gamma": 3})


def test_h100_curve_and_measured_profiles(tmp_path):
    from dspark.scheduler.sps import SPSProfile

    curve, name = load_sps("h100")
    assert "H100-like" in name and curve(1) > curve(8192) > 0
    traj = random_trace(gamma=7, seed=1)
    res = {s.label: simulate(traj, curve, s, concurrency=256, steps=60) for s in parse_policies("off,fixed,prefix,async", 7)}
    # at 256 requests the whole block (B = 2048) is compute-bound; the async policy's global search
    # sizes the step past Algorithm 1's first tile edge and beats both
    assert res["async"].goodput > max(res["prefix"].goodput, res["fixed γ"].goodput, res["off"].goodput)
    prof = SPSProfile.from_points([(1, 100.0), (64, 90.0), (65, 50.0), (4096, 2.0)], source="measured").save(tmp_path / "m.json")
    curve, name = load_sps(str(prof))
    assert name == "measured profile m.json" and curve(65) == 50.0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SimulationError, match="not a readable SPS profile"):
        load_sps(str(tmp_path / "bad.json"))
    with pytest.raises(SimulationError, match="neither 'h100' nor an existing file"):
        load_sps("a100")


def test_seeded_runs_repeat_and_seeds_differ():
    traj = random_trace()
    spec = PolicySpec("threshold", 0.6)
    a = simulate(traj, steep, spec, concurrency=8, replicas=2, steps=50, seed=5)
    b = simulate(traj, steep, spec, concurrency=8, replicas=2, steps=50, seed=5)
    c = simulate(traj, steep, spec, concurrency=8, replicas=2, steps=50, seed=6)
    assert a == b and a != c
    assert a.steps == 500  # ⌈4000 request-steps / 8 requests⌉ > 50


def test_every_policy_sees_the_same_requests():
    """The draws do not depend on the policy: verify-everything and verify-nothing replay the
    same rows, so fixed γ's τ − 1 equals the mean acceptance of what off replayed."""
    traj = random_trace()
    seen: dict[str, list[np.ndarray]] = {"off": [], "fixed": []}

    class Spy:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __call__(self, conf, gamma, n):
            seen[self.name].append(conf.copy())
            return self.inner(conf, gamma, n)

    for name in seen:
        pol = Spy(name, build_policy(PolicySpec(name), flat))
        simulate_replica(traj, pol, flat, 5, 40, np.random.default_rng(9))
    assert all(np.array_equal(x, y) for x, y in zip(seen["off"], seen["fixed"])) and len(seen["off"]) == 40


def test_replicas_split_the_load():
    traj = constant(gamma=4, a=3)
    one = simulate(traj, steep, PolicySpec("fixed", 2), concurrency=4, replicas=1, steps=10)
    two = simulate(traj, steep, PolicySpec("fixed", 2), concurrency=8, replicas=2, steps=10)
    assert two.goodput == pytest.approx(2 * one.goodput) and two.mean_batch == one.mean_batch
    # more replicas than requests: the idle ones add nothing
    assert simulate(traj, steep, PolicySpec("off"), concurrency=1, replicas=8, steps=5).goodput == pytest.approx(4000.0)


def test_bad_policy_output_and_bad_curves_are_reported():
    traj = constant(gamma=3, a=1)
    with pytest.raises(SimulationError, match="returned 1 lengths for 2 requests"):
        simulate_replica(traj, lambda c, g, n: [g], flat, 2, 3, np.random.default_rng(0))
    # as in the engine, lengths past γ are clipped to γ
    run = simulate_replica(traj, lambda c, g, n: [g + 1] * n, flat, 2, 3, np.random.default_rng(0))
    assert run.verified == 2 * 3 * 3 and run.tokens == 2 * 3 * 2
    with pytest.raises(SimulationError, match="steps/s at B = 2"):
        simulate(traj, lambda b: 0.0, PolicySpec("off"), concurrency=2, steps=3)
    with pytest.raises(SimulationError, match=">= 1"):
        simulate(traj, flat, PolicySpec("off"), concurrency=0)


def test_report_table_and_plot(tmp_path):
    traj = random_trace()
    res = run_grid(traj, steep, parse_policies("off,fixed", traj.gamma), concurrency=[1, 4], replicas=[1, 2], steps=20,
                   min_request_steps=0)
    assert [(r.replicas, r.concurrency, r.policy) for r in res][:3] == [(1, 1, "off"), (1, 1, "fixed γ"), (1, 4, "off")]
    md = render_markdown(res)
    assert "| replicas | concurrency | off tok/s | fixed γ tok/s | best |" in md
    assert "| 2 | 4 |" in md and "off (1.00× off)" in md and "fixed γ: τ / ℓ̄ / B" in md
    plot(res, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scheduler_modules_do_not_load_torch():
    code = ("import sys, dspark.scheduler.simulator, dspark.scheduler.sim_cli, dspark.verifier_service.trace; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ CLI
def _trace_file(path, gamma=4):
    from dspark.verifier_service.trace import Trace, save_trace

    rng = np.random.default_rng(0)
    n = 30
    prompts = [{"id": str(i), "token_ids": [1]} for i in range(3)]
    header = {"gamma": gamma, "target": "t", "drafter": "d", "temperature": 0.0, "prompts": prompts}
    acc = rng.integers(0, gamma + 1, n).astype(np.int16)
    trace = Trace(header, np.arange(n, dtype=np.int32) // 3, (np.arange(n) % 3).astype(np.int32), np.full(n, gamma, np.int16),
                  acc, np.zeros(n, bool), rng.random((n, gamma)).astype(np.float32))
    return save_trace(trace, path)


def test_simulate_cli_writes_the_benchmark_section(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dspark.scheduler import simulator
    from dspark.scheduler.sim_cli import simulate_command

    monkeypatch.setattr(simulator, "load_sps", lambda spec: (steep, f"test curve {spec}"))
    trace = _trace_file(tmp_path / "t.npz")
    bench, png = tmp_path / "BENCHMARKS.md", tmp_path / "plots" / "sim.png"
    res = CliRunner().invoke(simulate_command, [
        "--trace", str(trace), "--sps", "x", "--concurrency", "1,8", "--replicas", "1,2", "--policies", "off,fixed:2,fixed",
        "--steps", "10", "--min-request-steps", "0", "--output", str(bench), "--plot", str(png),
    ])
    assert res.exit_code == 0, res.output
    text = bench.read_text()
    assert "<!-- bench:simulate-x -->" in text and "test curve x" in text and "![simulated goodput](plots/sim.png)" in text
    assert "| 2 | 8 |" in text and "fixed 2 tok/s" in text and "--policies off,fixed:2,fixed" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    # --no-write leaves the files alone
    bench.unlink()
    res = CliRunner().invoke(simulate_command, ["--trace", str(trace), "--sps", "x", "--concurrency", "2", "--replicas", "1",
                                                "--policies", "off", "--steps", "3", "--min-request-steps", "0",
                                                "--output", str(bench), "--no-write"])
    assert res.exit_code == 0 and "| 1 | 2 |" in res.output and not bench.exists()


@pytest.mark.parametrize("args,msg", [
    (["--trace", "{tmp}/missing.npz"], "does not exist"),
    (["--trace", "{tmp}/bad.npz"], "not a trace file"),
    (["--trace", "{tmp}/t.npz", "--policies", "fixed:9"], "fixed length must be in 0..4"),
    (["--trace", "{tmp}/t.npz", "--sps", "{tmp}/nope.json"], "nope.json"),
    (["--trace", "{tmp}/t.npz", "--concurrency", "0"], "positive integers"),
])
def test_simulate_cli_user_errors(tmp_path, args, msg):
    from click.testing import CliRunner

    from dspark.scheduler.sim_cli import simulate_command

    _trace_file(tmp_path / "t.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    res = CliRunner().invoke(simulate_command, [a.format(tmp=tmp_path) for a in args] + ["--no-write"])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
