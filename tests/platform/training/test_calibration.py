"""Sequential Temperature Scaling: metrics against hand and brute-force computations, recovery of
known distortions on synthetic data (with a well-calibrated negative control), temperatures in
the drafter checkpoint and in ``propose``, and the ``calibrate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _helpers import drafter_config, randomize
from dspark.drafter_service.checkpoint import (
    TEMPERATURE_KEY,
    WEIGHTS_NAME,
    DrafterLoadError,
    load_drafter,
    save_confidence_temperature,
    save_drafter,
)
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import EngineConfig, TargetConfig
from dspark.platform.training.calibration import (
    CalibrationReport,
    auroc,
    brier,
    calibrate_drafter,
    calibration_report,
    ece,
    fit_sts,
    logit,
    plot_reliability,
    prefix_outcomes,
    reliability_bins,
    survival,
)
from dspark.platform.training.eval_cli import calibrate_command


# ------------------------------------------------------------------------------ metrics
def test_ece_by_hand():
    p, y = np.array([0.1, 0.2, 0.9, 0.95]), np.array([0, 1, 1, 1])
    assert ece(p, y, bins=10) == pytest.approx(0.25 * 0.1 + 0.25 * 0.8 + 0.5 * 0.075)
    # p = 1 falls in the last bin; a perfectly calibrated two-bin case has ECE 0
    assert ece(np.array([1.0, 1.0]), np.array([1, 1]), bins=20) == 0.0
    assert ece(np.array([0.25] * 4 + [0.75] * 4), np.array([1, 0, 0, 0, 1, 1, 1, 0]), bins=2) == pytest.approx(0.0)
    assert np.isnan(ece(np.array([]), np.array([])))
    mean_p, frac, n = reliability_bins(np.array([0.1, 0.2, 0.9, 0.95]), np.array([0, 1, 1, 1]), bins=10)
    assert n.tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 2] and frac[9] == 1.0 and mean_p[9] == pytest.approx(0.925)


def _brute_auroc(p, y):
    pos, neg = p[y == 1], p[y == 0]
    return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(120), 1)  # many ties
    y = (rng.random(120) < p).astype(int)
    assert auroc(p, y) == pytest.approx(_brute_auroc(p, y), abs=1e-12)
    assert auroc(np.array([0.2, 0.2]), np.array([1, 0])) == 0.5
    assert np.isnan(auroc(np.array([0.3, 0.4]), np.array([1, 1])))


def test_brier_survival_and_outcomes_by_hand():
    assert brier(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx((0.04 + 0.09) / 2)
    z = np.array([[0.0, np.log(3.0)], [2.0, -1.0]])
    s = survival(z, np.array([1.0, 2.0]))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(s, [[0.5, 0.5 * sig(np.log(3.0) / 2)], [sig(2.0), sig(2.0) * sig(-0.5)]])
    y, obs = prefix_outcomes(np.array([3, 1]), np.array([2, 0]), 3)
    assert y.astype(int).tolist() == [[1, 1, 0], [0, 0, 0]] and obs.astype(int).tolist() == [[1, 1, 1], [1, 0, 0]]
    np.testing.assert_allclose(logit(np.array([0.5, 0.75])), [0.0, np.log(3.0)])
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()


# ------------------------------------------------------------------------------ STS on synthetic data
def synth(n: int, distort, seed: int):
    """Steps whose true conditional acceptance is σ(u_k); the head reports z = u · distort_k, so
    the right STS temperatures are exactly ``distort``. As under whole-block verification most
    steps verify all γ drafts; 20% verify a random shorter prefix."""
    rng = np.random.default_rng(seed)
    gamma = len(distort)
    u = rng.normal(1.5, 1.5, size=(n, gamma))
    accept_each = rng.random((n, gamma)) < 1 / (1 + np.exp(-u))
    run = np.cumprod(accept_each, axis=1).sum(axis=1)  # leading accepted drafts
    lengths = np.where(rng.random(n) < 0.8, gamma, rng.integers(1, gamma + 1, size=n))
    accepted = np.minimum(run, lengths)
    y, observed = prefix_outcomes(lengths, accepted, gamma)
    return u * np.asarray(distort)[None], y, observed


def _mean_ece(z, y, obs, temps, bins=20):
    s = survival(z, temps)
    return np.mean([ece(s[obs[:, k], k], y[obs[:, k], k], bins) for k in range(z.shape[1])])


def test_sts_recovers_known_temperatures_and_lowers_ece():
    distort = np.array([2.5, 0.5, 1.6, 3.0])  # over-, under-, over-, over-confident
    z, y, obs = synth(20000, distort, seed=0)
    temps = fit_sts(z, y, obs)
    # ECE is a noisy objective and later positions see the product of earlier fits: position 1 is
    # recovered within a few percent, the rest within ~25% (over 8 seeds the worst was 15%)
    err = np.abs(np.log(temps / distort))
    assert err[0] < 0.1 and np.all(err < 0.25), (temps, distort)
    # on fresh steps from the same process: ECE drops to the sampling-noise floor (~0.01 here)
    z2, y2, obs2 = synth(20000, distort, seed=100)
    before, after = _mean_ece(z2, y2, obs2, np.ones(4)), _mean_ece(z2, y2, obs2, temps)
    assert before > 0.05 and after < 0.02 and after < before / 3, (before, after)


def test_sts_leaves_calibrated_confidences_alone():
    z, y, obs = synth(20000, np.ones(4), seed=2)
    temps = fit_sts(z, y, obs)
    assert np.all(np.abs(np.log(temps)) < 0.25), temps
    z2, y2, obs2 = synth(20000, np.ones(4), seed=102)
    before, after = _mean_ece(z2, y2, obs2, np.ones(4)), _mean_ece(z2, y2, obs2, temps)
    assert before < 0.02 and after < before + 0.005, (before, after)


def test_sparse_positions_keep_unit_temperature_and_order_is_preserved():
    z, y, obs = synth(4000, np.array([2.0, 2.0, 2.0]), seed=4)
    obs[:, 2] &= np.arange(len(obs)) < 10  # only 10 rows observed at position 3
    temps = fit_sts(z, y, obs, min_rows=20)
    assert temps[2] == 1.0 and temps[0] > 1.3
    rep = calibration_report(z, y, obs, temps)
    # a temperature is monotone in z: position 1's ranking and so its AUROC cannot change
    assert rep.positions[0].auroc_after == pytest.approx(rep.positions[0].auroc_before)
    assert rep.positions[0].ece_after < rep.positions[0].ece_before


def test_report_round_trips_and_plots(tmp_path):
    z, y, obs = synth(3000, np.array([2.0, 0.7]), seed=5)
    rep = calibration_report(z, y, obs, fit_sts(z, y, obs), bins=10, source="synthetic")
    raw = json.loads(rep.save_json(tmp_path / "c.json").read_text())
    back = CalibrationReport.from_dict(raw)
    assert back.temperatures == rep.temperatures and back.positions[1].ece_after == pytest.approx(rep.positions[1].ece_after)
    assert "ECE (10 bins)" in rep.markdown() and "mean" in rep.markdown()
    png = plot_reliability(rep, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ drafter and checkpoint
@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    from dspark.platform.target.loading import load_target

    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


def _drafter(target, kind_id="dspark-vanilla", seed=0):
    torch.manual_seed(seed)
    d = build_drafter(drafter_config(kind_id), target)
    randomize(d, seed)
    return d


def _confidences(drafter, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidences) of one greedy proposal after a fixed 12-token context."""
    from dspark.platform.sampling import SamplingBatch

    ids = torch.arange(10, 22)[None]
    out = target(ids)
    drafter.allocate(1, 64)
    drafter.append_context(torch.tensor([0]), ids, out.features, out.last_hidden, torch.tensor([12]))
    block = drafter.propose(torch.tensor([0]), torch.tensor([30]), torch.tensor([12]),
                            SamplingBatch.from_params([(0.0, 0, 1.0)], [None]))
    return block.tokens, block.confidences


@pytest.mark.parametrize("kind_id", ["dspark-vanilla", "eagle3"])
def test_temperatures_round_trip_and_scale_proposed_confidences(demo, kind_id, tmp_path):
    d = _drafter(demo, kind_id)
    assert torch.equal(d.confidence_temperature, torch.ones(4))
    save_drafter(d, tmp_path / "c")
    temps = [0.5, 2.0, 1.0, 4.0]
    save_confidence_temperature(tmp_path / "c", temps)
    e = load_drafter(tmp_path / "c", demo)
    assert e.confidence_temperature.tolist() == temps and e.confidence_temperature.dtype == torch.float32
    for (n1, p1), (n2, p2) in zip(d.named_parameters(), e.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    tok_d, c_d = _confidences(d, demo)
    tok_e, c_e = _confidences(e, demo)
    assert torch.equal(tok_d, tok_e)  # temperatures never change the drafts
    expected = torch.sigmoid(torch.logit(c_d.double()) / torch.tensor(temps, dtype=torch.float64))
    torch.testing.assert_close(c_e.double(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(c_e, c_d, atol=1e-3)


def test_old_and_broken_checkpoints(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _drafter(demo)
    ckpt = save_drafter(d, tmp_path / "c")
    weights = ckpt / WEIGHTS_NAME
    state = load_file(str(weights))
    assert torch.equal(state[TEMPERATURE_KEY], torch.ones(4))
    # a checkpoint from before calibration existed: no temperatures -> ones
    save_file({k: v for k, v in state.items() if k != TEMPERATURE_KEY}, str(weights))
    assert torch.equal(load_drafter(ckpt, demo).confidence_temperature, torch.ones(4))
    # everything else stays strict
    save_file({**state, "bogus.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(DrafterLoadError, match="unexpected.*bogus"):
        load_drafter(ckpt, demo)
    save_file({**state, TEMPERATURE_KEY: torch.ones(3)}, str(weights))
    with pytest.raises(DrafterLoadError, match="cannot load the weights"):
        load_drafter(ckpt, demo)
    save_file({**state, TEMPERATURE_KEY: torch.tensor([1.0, 0.0, 1.0, 1.0])}, str(weights))
    with pytest.raises(DrafterLoadError, match="positive and finite"):
        load_drafter(ckpt, demo)
    with pytest.raises(DrafterLoadError, match="need 4 positive"):
        save_confidence_temperature(ckpt, [1.0, 2.0])
    with pytest.raises(ValueError, match="need 4 positive"):
        d.set_confidence_temperature([1.0, -1.0, 1.0, 1.0])


def test_temperatures_stay_float32_in_a_bf16_drafter(tiny_demo_target):
    from dspark.platform.target.loading import load_target

    t = load_target(TargetConfig(path=str(tiny_demo_target.path), dtype="bfloat16"))
    d = build_drafter(drafter_config("dspark-vanilla"), t)
    assert d.fc.weight.dtype == torch.bfloat16 and d.confidence_temperature.dtype == torch.float32


# ------------------------------------------------------------------------------ runner and CLI
def test_calibrate_drafter_through_the_engine(demo):
    from dspark.platform.training.evaluate import EvalConfig, load_prompts

    cfg = EvalConfig(num_prompts=4, prompt_min_tokens=8, prompt_max_tokens=24, demo_target={"max_corpus_mb": 0.6})
    _, prompts = load_prompts(demo.tokenizer, "validation", cfg)
    d = _drafter(demo)
    d.set_confidence_temperature([2.0, 2.0, 2.0, 2.0])  # "before" is what the drafter had
    rep = calibrate_drafter(demo, d, prompts, temperatures=(0.0, 1.0), max_tokens=16,
                            engine=EngineConfig(max_batch_size=4), min_rows=5, install=False)
    assert rep.temperatures_before == [2.0] * 4 and d.confidence_temperature.tolist() == [2.0] * 4  # restored
    assert len(rep.positions) == 4 and rep.positions[0].rows > 0
    # rows: steps of both sampling temperatures, each verifying the whole block (up to max_tokens)
    assert rep.positions[0].rows >= rep.positions[3].rows > 0
    rep2 = calibrate_drafter(demo, d, prompts, temperatures=(0.0, 1.0), max_tokens=16,
                             engine=EngineConfig(max_batch_size=4), min_rows=5)
    assert d.confidence_temperature.tolist() == pytest.approx(rep2.temperatures)
    assert rep2.temperatures == pytest.approx(rep.temperatures)  # fitted from raw logits, whatever was installed


def test_calibrate_cli(demo, tiny_demo_target, tmp_path):
    ckpt = save_drafter(_drafter(demo), tmp_path / "drafter")
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):\n    return"}) for i in range(4)) + "\n")
    res = CliRunner().invoke(calibrate_command, [
        "--drafter", str(ckpt), "--data", str(data), "--temperatures", "1", "--max-tokens", "12",
        "--set", f"target.path={tiny_demo_target.path}", "--set", "calibration.min_rows=3",
    ])
    assert res.exit_code == 0, res.output
    assert "ECE" in res.output and "->" in res.output
    rep = json.loads((ckpt / "calibration.json").read_text())
    assert (ckpt / "reliability.png").is_file() and (ckpt / "calibration.md").is_file()
    assert load_drafter(ckpt, demo).confidence_temperature.tolist() == pytest.approx(rep["temperatures"])


def test_calibrate_cli_user_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(calibrate_command, ["--drafter", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "error:" in res.output and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(calibrate_command, ["--drafter", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "not a drafter checkpoint" in res.output
    res = runner.invoke(calibrate_command, ["--drafter", str(tmp_path / "empty"), "--set", "calibration.t_min=0"])
    assert res.exit_code == 2 and "calibration.t_min" in res.output
    assert "Traceback" not in res.output
