"""The training objective: anchors, block targets, teacher probabilities, loss terms against hand
computations, position weights, data-parallel normalisation (simulated and over two real gloo
processes), metrics, and the loss configuration."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.testing import assert_close

from dspark.drafter_service.providers.dspark import block_attention_mask
from dspark.platform.training.objective import (
    KIND_DEFAULTS,
    LOSS_TERMS,
    LossConfig,
    LossWeights,
    Parts,
    all_reduce_parts,
    block_targets,
    expected_acceptance,
    finalize,
    loss_parts,
    metric_parts,
    position_weights,
    sample_anchors,
    teacher_probs,
)

ALL = LossWeights(ce=1.0, tv=1.0, soft_ce=1.0, conf=1.0, decay=1.0, detach_confidence=False)


# ==== anchors ===================================================================================


def test_anchor_worked_example_and_all_valid_taken():
    m = torch.tensor([[0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    anchors, keep = sample_anchors(m, 4, torch.Generator().manual_seed(0))
    assert anchors.tolist() == [[1, 2]] and keep.tolist() == [[True, True]]


def test_anchor_sampler_properties():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(6, 40, generator=g) < 0.8
    m[3] = False  # a sequence with no valid anchor at all
    m[4, :] = False
    m[4, 10:13] = True  # exactly two valid positions (10, 11)
    valid = torch.zeros_like(m)
    valid[:, :-1] = m[:, :-1] & m[:, 1:]
    anchors, keep = sample_anchors(m, 8, torch.Generator().manual_seed(1))
    assert anchors.shape == keep.shape == (6, 8) and anchors.dtype == torch.int64
    for b in range(6):
        n_keep = int(keep[b].sum())
        assert n_keep == min(8, int(valid[b].sum()))
        assert keep[b, :n_keep].all() and not keep[b, n_keep:].any()  # kept first, unused after
        kept = anchors[b, :n_keep]
        assert bool(valid[b, kept].all())  # m_i and m_{i+1}
        assert len(set(kept.tolist())) == n_keep  # without replacement
        assert kept.tolist() == sorted(kept.tolist())
        assert (anchors[b, n_keep:] == 0).all()
    assert anchors[4, :2].tolist() == [10, 11] and not keep[3].any()
    # deterministic given the generator; another seed draws another subset
    again, keep2 = sample_anchors(m, 8, torch.Generator().manual_seed(1))
    assert torch.equal(again, anchors) and torch.equal(keep2, keep)
    other, _ = sample_anchors(m, 8, torch.Generator().manual_seed(2))
    assert not torch.equal(other, anchors)


def test_anchor_width_is_capped_by_the_most_valid_positions():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, 2:6] = True  # valid 2, 3, 4
    anchors, keep = sample_anchors(m, 512)
    assert anchors.shape == (2, 3) and keep.sum(1).tolist() == [3, 0]
    none, keep_none = sample_anchors(torch.zeros(1, 5, dtype=torch.bool), 4)
    assert none.shape == (1, 1) and not keep_none.any()  # never a zero-width batch


def test_anchor_sampler_is_uniform():
    m = torch.ones(1, 11, dtype=torch.bool)  # valid positions 0..9
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(11)
    n = 3000
    for _ in range(n):
        a, _ = sample_anchors(m, 3, g)
        counts[a[0]] += 1
    freq = counts[:10] / n
    assert counts[10] == 0
    assert (freq - 0.3).abs().max() < 0.04, freq  # each position with probability 3/10


# ==== block targets, teacher, mask ==============================================================


def test_block_targets_worked_example():
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    m = torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool)
    labels, ev = block_targets(ids, m, torch.tensor([[1, 0, 3]]), torch.tensor([[True, True, False]]), 3)
    assert labels.tolist() == [[[12, 13, 14], [11, 12, 13], [14, 0, 0]]]
    # slot 2 of block p=1 leaves the loss mask, so slot 3 (back inside it) is cut too (prefix);
    # block p=3 is not kept; slots past the sequence end are never evaluated
    assert ev.tolist() == [[[True, False, False], [True, True, False], [False, False, False]]]
    full = torch.ones_like(m)
    _, ev_end = block_targets(ids, full, torch.tensor([[2]]), torch.tensor([[True]]), 4)
    assert ev_end.tolist() == [[[True, True, False, False]]]  # positions 3, 4 exist; 5, 6 do not


def test_teacher_probs_read_the_target_one_position_before_each_label():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 5, bias=False)
    hid = torch.randn(2, 6, 4)
    anchors = torch.tensor([[0, 3], [4, 1]])
    p = teacher_probs(hid, head, anchors, 3)
    assert p.shape == (2, 2, 3, 5) and p.dtype == torch.float32 and not p.requires_grad
    for b in range(2):
        for a in range(2):
            for k in range(3):
                row = min(int(anchors[b, a]) + k, 5)  # slot k+1 reads position p + k (clamped at the end)
                assert_close(p[b, a, k], head(hid[b, row]).softmax(-1), atol=1e-6, rtol=0)
    assert_close(teacher_probs(hid.bfloat16(), head.bfloat16(), anchors, 3).sum(-1), torch.ones(2, 2, 3))


def test_training_attention_mask_small_example():
    """Two blocks of γ = 2 at anchors 0 and 2 over S = 3 context rows: block 0 sees no context
    (only itself), block 1 sees rows 0, 1 (not its anchor's row 2) and itself; never each other."""
    m = block_attention_mask(torch.tensor([[0, 2]]), 3, 2)[0, 0].int()
    expected = torch.tensor(
        [[0, 0, 0, 1, 1, 0, 0]] * 2 + [[1, 1, 0, 0, 0, 1, 1]] * 2, dtype=torch.int32
    )
    assert torch.equal(m, expected)


# ==== loss terms ================================================================================


def _hand_batch():
    """V = 3, γ = 2, one block, both slots evaluated.

    slot 1: z = [0, 0, 0] → p_d = [1/3]·3; p_t = [1/2, 1/2, 0]; label 0; conf logit 0
    slot 2: z = [ln 2, 0, 0] → p_d = [1/2, 1/4, 1/4]; p_t = [0, 0, 1]; label 2; conf logit ln 3
    """
    logits = torch.tensor([[[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]]]], requires_grad=True)
    p_t = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]])
    labels = torch.tensor([[[0, 2]]])
    ev = torch.tensor([[[True, True]]])
    conf = torch.tensor([[[0.0, math.log(3)]]], requires_grad=True)
    return logits, p_t, labels, ev, conf


def test_loss_terms_by_hand():
    logits, p_t, labels, ev, conf = _hand_batch()
    w2 = math.exp(-1.0)  # decay 1: weights 1, e^−1
    den = 1 + w2
    ce = (math.log(3) + w2 * math.log(4)) / den
    l1 = (2 / 3 + w2 * 1.5) / den  # |1/3−1/2|·2 + 1/3 ; 1/2 + 1/4 + 3/4
    soft = (math.log(3) + w2 * math.log(4)) / den  # −Σ p_t log p_d
    bce1 = math.log(2)  # c = 1/2, any target
    c2, y2 = 0.75, 1 - 0.5 * 1.5  # c* = 1 − ½‖·‖₁ = 1/4
    bce2 = -(y2 * math.log(c2) + (1 - y2) * math.log(1 - c2))
    conf_t = (bce1 + w2 * bce2) / den
    parts = loss_parts(logits, p_t, labels, ev, conf, decay=1.0)
    assert parts.names == LOSS_TERMS
    assert_close(parts.den, torch.full((4,), den))
    weights = LossWeights(ce=0.5, tv=2.0, soft_ce=0.25, conf=3.0, decay=1.0, detach_confidence=False)
    loss, values = finalize(parts, weights)
    expected = {"ce": ce, "tv": l1, "soft_ce": soft, "conf": conf_t}
    for name, v in expected.items():
        assert values[name] == pytest.approx(v, rel=1e-5), name
    total = 0.5 * ce + 2.0 * l1 + 0.25 * soft + 3.0 * conf_t
    assert loss.item() == pytest.approx(total, rel=1e-5) and values["loss"] == pytest.approx(total, rel=1e-5)


def test_unevaluated_slots_do_not_count():
    logits, p_t, labels, ev, conf = _hand_batch()
    ev = torch.tensor([[[True, False]]])
    _, values = finalize(loss_parts(logits, p_t, labels, ev, conf, decay=1.0), ALL)
    assert values["ce"] == pytest.approx(math.log(3), rel=1e-6)  # slot 1 alone
    assert values["tv"] == pytest.approx(2 / 3, rel=1e-6)
    # garbage in an unevaluated slot changes nothing
    junk = logits.detach().clone()
    junk[0, 0, 1] = torch.tensor([50.0, -50.0, 3.0])
    _, v2 = finalize(loss_parts(junk, p_t, labels, ev, conf, decay=1.0), ALL)
    assert v2 == pytest.approx(values)


def test_confidence_target_is_detached_and_missing_head_has_no_term():
    logits, p_t, labels, ev, conf = _hand_batch()
    only_conf = LossWeights(ce=0.0, tv=0.0, soft_ce=0.0, conf=1.0, decay=1.0, detach_confidence=False)
    loss, _ = finalize(loss_parts(logits, p_t, labels, ev, conf, decay=1.0), only_conf)
    loss.backward()
    assert logits.grad is None or not logits.grad.any()  # c* gives no gradient to the drafter logits
    assert conf.grad.abs().sum() > 0
    # negative control: the TV term does reach the logits
    only_tv = LossWeights(ce=0.0, tv=1.0, soft_ce=0.0, conf=0.0, decay=1.0, detach_confidence=False)
    finalize(loss_parts(logits, p_t, labels, ev, conf, decay=1.0), only_tv)[0].backward()
    assert logits.grad.abs().sum() > 0
    parts = loss_parts(logits, p_t, labels, ev, None, decay=1.0)
    loss, values = finalize(parts, ALL)
    assert "conf" not in values and parts.den[3] == 0 and torch.isfinite(loss)


def test_position_weights():
    w = position_weights(7, 4.0)
    assert_close(w, torch.tensor([1.0, 0.7788, 0.6065, 0.4724, 0.3679, 0.2865, 0.2231]), atol=1e-4, rtol=0)
    eagle = position_weights(5, KIND_DEFAULTS["eagle3"].decay)
    assert_close(eagle, 0.8 ** torch.arange(5, dtype=torch.float32))


def test_position_weights_enter_the_loss():
    """Same per-slot CE, different weights: the weighted mean moves toward the heavier slot."""
    logits, p_t, labels, ev, conf = _hand_batch()
    for decay in (0.5, 4.0, 1e6):
        w2 = math.exp(-1.0 / decay)
        _, values = finalize(loss_parts(logits, p_t, labels, ev, conf, decay=decay), ALL)
        assert values["ce"] == pytest.approx((math.log(3) + w2 * math.log(4)) / (1 + w2), rel=1e-5)


# ==== normalisation across ranks ================================================================


def _random_batch(seed: int = 0, b: int = 4, a: int = 3, g: int = 4, v: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, g, v, generator=gen)
    p_t = torch.randn(b, a, g, v, generator=gen).mul(2).softmax(-1)
    labels = torch.randint(0, v, (b, a, g), generator=gen)
    logits[2:] *= 3  # the second half is much less like p_t than the first
    lengths = torch.tensor([[4, 4, 3], [2, 4, 3], [1, 0, 0], [0, 2, 0]])  # very uneven per sequence
    ev = torch.arange(g)[None, None] < lengths[..., None]
    conf = torch.randn(b, a, g, generator=gen)
    return logits, p_t, labels, ev, conf


def test_two_rank_split_equals_the_whole_batch():
    logits, p_t, labels, ev, conf = _random_batch()
    weights = KIND_DEFAULTS["dspark"]
    leaf = logits.clone().requires_grad_(True)
    whole = loss_parts(leaf, p_t, labels, ev, conf, weights.decay)
    loss_w, values_w = finalize(whole, weights)
    (grad_w,) = torch.autograd.grad(loss_w, leaf)

    halves = [slice(0, 2), slice(2, 4)]
    parts = [loss_parts(leaf[s], p_t[s], labels[s], ev[s], conf[s], weights.decay) for s in halves]
    summed = parts[0] + parts[1]
    loss_s, values_s = finalize(summed, weights)
    assert loss_s.item() == pytest.approx(loss_w.item(), rel=1e-6)
    assert values_s == pytest.approx(values_w, rel=1e-6)
    # what each rank gets back from the all-reduce, then backward on each rank and DP-average
    reduced = [p.with_totals(summed.num.detach(), summed.den, 2) for p in parts]
    rank_losses = [finalize(r, weights) for r in reduced]
    for _, vals in rank_losses:
        assert vals == pytest.approx(values_w, rel=1e-6)  # every rank logs the global values
    (grad_s,) = torch.autograd.grad(sum(l for l, _ in rank_losses) / 2, leaf)
    assert_close(grad_s, grad_w, atol=1e-7, rtol=1e-5)
    # negative control: averaging per-rank means is NOT the global weighted mean here
    naive = sum(finalize(p, weights)[0].item() for p in parts) / 2
    assert abs(naive - loss_w.item()) > 1e-3


def test_all_reduce_without_a_process_group_is_the_identity():
    logits, p_t, labels, ev, conf = _random_batch()
    parts = loss_parts(logits, p_t, labels, ev, conf, 4.0)
    red = all_reduce_parts(parts)
    assert red.world_size == 1 and torch.equal(red.den, parts.den) and torch.equal(red.num_total, parts.num.detach())
    assert finalize(red, ALL)[1] == finalize(parts, ALL)[1]
    with pytest.raises(ValueError, match="unreduced"):
        red + parts


_RANK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from dspark.platform.training.objective import (
        KIND_DEFAULTS, all_reduce_parts, expected_acceptance, finalize, loss_parts, metric_parts,
    )
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    data = torch.load(sys.argv[4])
    s = slice(0, 2) if rank == 0 else slice(2, 4)
    leaf = data["logits"][s].clone().requires_grad_(True)
    w = KIND_DEFAULTS["dspark"]
    parts = loss_parts(leaf, data["p_t"][s], data["labels"][s], data["ev"][s], data["conf"][s], w.decay)
    parts = all_reduce_parts(parts)
    loss, values = finalize(parts, w)
    loss.backward()
    acc = expected_acceptance(data["logits"][s], data["p_t"][s])
    metrics = all_reduce_parts(metric_parts(acc, data["ev"][s], data["conf"][s])).values()
    torch.save(dict(values=values, grad=leaf.grad, metrics=metrics), out)
    dist.destroy_process_group()
    """
)


def test_all_reduce_over_two_gloo_processes(tmp_path: Path):
    logits, p_t, labels, ev, conf = _random_batch(seed=3)
    torch.save(dict(logits=logits, p_t=p_t, labels=labels, ev=ev, conf=conf), tmp_path / "batch.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(r), init, str(tmp_path / f"out{r}.pt"),
             str(tmp_path / "batch.pt")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    res = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    w = KIND_DEFAULTS["dspark"]
    leaf = logits.clone().requires_grad_(True)
    loss_w, values_w = finalize(loss_parts(leaf, p_t, labels, ev, conf, w.decay), w)
    loss_w.backward()
    metrics_w = metric_parts(expected_acceptance(logits, p_t), ev, conf).values()
    for r in res:
        assert r["values"] == pytest.approx(values_w, rel=1e-6)
        assert r["metrics"] == pytest.approx(metrics_w, rel=1e-6)
    # DDP averages the ranks' gradients: that average equals the whole-batch gradient
    grad = torch.cat([res[0]["grad"], res[1]["grad"]]) / 2
    assert_close(grad, leaf.grad, atol=1e-7, rtol=1e-5)


# ==== metrics ===================================================================================


def test_expected_acceptance_by_hand():
    acc = expected_acceptance(torch.zeros(1, 3), torch.tensor([[0.5, 0.5, 0.0]]))
    assert acc.item() == pytest.approx(2 / 3)
    assert expected_acceptance(torch.tensor([[0.0, -1e4]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0)


def test_metrics_by_hand():
    # two blocks of γ = 2: α = [0.8, 0.5] (both evaluated), [0.6, 0.9] (slot 2 not evaluated)
    accept = torch.tensor([[[0.8, 0.5], [0.6, 0.9]]])
    ev = torch.tensor([[[True, True], [True, False]]])
    conf = torch.zeros(1, 2, 2)  # c = 1/2 everywhere
    values = metric_parts(accept, ev, conf).values()
    assert values["accept_rate@1"] == pytest.approx(0.7)
    assert values["accept_rate@2"] == pytest.approx(0.5)
    # τ = 1 + Σ_k Π_{j≤k} α_j: block 1: 1 + 0.8 + 0.4; block 2: 1 + 0.6 (masked α = 0)
    assert values["tau_probabilistic"] == pytest.approx((2.2 + 1.6) / 2)
    assert values["confidence_abs_error"] == pytest.approx((0.3 + 0.0 + 0.1) / 3)
    assert values["confidence_bias"] == pytest.approx(-0.4 / 3)
    # cumulative products: block 1 [0.5, 0.25] vs [0.8, 0.4]; block 2 [0.5] vs [0.6]
    assert values["confidence_cumprod_bias"] == pytest.approx((-0.3 - 0.15 - 0.1) / 3)
    assert "confidence_bias" not in metric_parts(accept, ev).values()


def test_metric_parts_add_like_the_whole():
    g = torch.Generator().manual_seed(0)
    accept = torch.rand(4, 3, 5, generator=g)
    ev = (torch.arange(5)[None, None] < torch.randint(0, 6, (4, 3, 1), generator=g))
    conf = torch.randn(4, 3, 5, generator=g)
    whole = metric_parts(accept, ev, conf).values()
    split = (metric_parts(accept[:1], ev[:1], conf[:1]) + metric_parts(accept[1:], ev[1:], conf[1:])).values()
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-6)


# ==== configuration =============================================================================


def test_loss_config_kind_defaults_and_overrides():
    cfg = LossConfig()
    assert cfg.resolve("dspark").alphas() == (0.1, 0.9, 0.0, 1.0) and cfg.resolve("dspark").decay == 4.0
    assert not cfg.resolve("dspark").detach_confidence
    assert cfg.resolve("dflash").alphas() == (1.0, 0.0, 0.0, 0.0)
    assert cfg.resolve("eagle3").alphas() == (0.0, 0.0, 1.0, 0.0)
    assert cfg.resolve("mtp1").alphas() == (0.0, 0.0, 1.0, 0.0)
    over = LossConfig(tv_weight=0.5, decay=7.0, confidence_weight=0.0).resolve("dspark")
    assert over.alphas() == (0.1, 0.5, 0.0, 0.0) and over.decay == 7.0
    side_car = LossConfig(confidence_weight=1.0).resolve("dflash")
    assert side_car.conf == 1.0 and side_car.detach_confidence
    with pytest.raises(ValueError, match="no loss defaults"):
        cfg.resolve("medusa")
    with pytest.raises(ValueError, match="every loss weight is 0"):
        LossConfig(ce_weight=0.0).resolve("dflash")


@pytest.mark.parametrize(
    "bad",
    [dict(tv_wieght=1.0), dict(ce_weight=-1.0), dict(decay=0.0), dict(num_anchors=0),
     dict(ce_weight=0.0, tv_weight=0.0, soft_ce_weight=0.0, confidence_weight=0.0)],
)
def test_loss_config_is_strict(bad):
    with pytest.raises(ValidationError):
        LossConfig(**bad)


def test_loss_config_fields_are_documented():
    assert all(f.description for f in LossConfig.model_fields.values())


def test_parts_refuse_mismatched_names():
    a = Parts(("x",), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError):
        a + Parts(("y",), torch.ones(1), torch.ones(1))
