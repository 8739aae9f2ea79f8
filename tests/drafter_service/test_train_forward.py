"""``Drafter.train_forward`` for every kind: it drafts exactly what ``propose`` drafts (so training
optimises what inference runs), never looks past an anchor, trains only the trainable
parameters, and a few optimiser steps on one batch lower the kind's default loss."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dspark.platform.training.objective import (
    LOSS_TERMS,
    LossConfig,
    LossWeights,
    all_reduce_parts,
    block_targets,
    finalize,
    loss_parts,
    sample_anchors,
    teacher_probs,
)

ATOL = dict(atol=2e-5, rtol=0)
#: (batch row, anchor position) of the blocks of the consistency test; one slot each
BLOCKS = {0: [(0, 0), (0, 11)], 1: [(1, 5), (1, 9)]}
ALL_TERMS = LossWeights(ce=1.0, tv=1.0, soft_ce=1.0, conf=1.0, decay=4.0, detach_confidence=False)


def _proposed_blocks(d, ids, feats, hid, h):
    """Greedy ``propose`` at each anchor of BLOCKS after appending x_0..x_{p−1} to its own slot:
    (anchors [2, 2], labels = drafted tokens [2, 2, γ], logits [2, 2, γ, V], confidences [2, 2, γ])."""
    anchors, tokens, logits, confs = [], [], [], []
    slot = 0
    for row in (0, 1):
        for b, p in BLOCKS[row]:
            if p:
                d.append_context(torch.tensor([slot]), ids[b : b + 1, :p], feats[b : b + 1, :p],
                                 hid[b : b + 1, :p], torch.tensor([p]))
            blk = d.propose(torch.tensor([slot]), ids[b, p : p + 1], torch.tensor([p]), h.greedy(1))
            anchors.append(p)
            tokens.append(blk.tokens[0])
            logits.append(blk.logits[0])
            confs.append(blk.confidences[0])
            slot += 1
    shape = lambda xs: torch.stack(xs).view(2, 2, *xs[0].shape)  # noqa: E731
    return torch.tensor(anchors).view(2, 2), shape(tokens), shape(logits), shape(confs)


def test_train_forward_equals_propose(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 16, batch=2)
    anchors, labels, logits, confs = _proposed_blocks(d, ids, feats, hid, h)
    keep = torch.ones(2, 2, dtype=torch.bool)
    with torch.no_grad():
        out = d.train_forward(ids, feats, hid, anchors, keep, labels)
    gamma = d.block_size
    assert out.logits.shape == (2, 2, gamma, target.vocab_size) and out.logits.dtype == torch.float32
    assert out.confidence_logits.shape == (2, 2, gamma) and out.confidence_logits.dtype == torch.float32
    assert logits.abs().max() > 0.1  # the comparison is not between near-zero tensors
    assert_close(out.logits, logits, **ATOL)
    assert_close(torch.sigmoid(out.confidence_logits), confs, **ATOL)
    assert torch.equal(out.logits.argmax(-1), labels)  # greedy drafts are the argmax of their logits

    # the sequential parts are teacher-forced on the labels: another slot-1 label changes slot 2
    # (DSpark's Markov head, EAGLE's next step) — not DFlash, which has no sequential part
    other = labels.clone()
    other[..., 0] = (other[..., 0] + 1) % target.vocab_size
    with torch.no_grad():
        moved = d.train_forward(ids, feats, hid, anchors, keep, other)
    assert_close(moved.logits[..., 0, :], out.logits[..., 0, :], **ATOL)
    if gamma > 1:
        delta = (moved.logits[..., 1, :] - out.logits[..., 1, :]).abs().max()
        assert (delta > 1e-3) == (kind_id != "dflash"), float(delta)


def test_train_forward_never_looks_past_the_anchor(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 16)
    p = 7
    anchors, keep = torch.tensor([[p]]), torch.ones(1, 1, dtype=torch.bool)
    labels = torch.randint(0, target.vocab_size, (1, 1, d.block_size), generator=torch.Generator().manual_seed(0))

    def run(ids_, feats_, hid_):
        with torch.no_grad():
            o = d.train_forward(ids_, feats_, hid_, anchors, keep, labels)
        return o.logits, o.confidence_logits

    base = run(ids, feats, hid)
    later_ids, later_f, later_h = ids.clone(), feats.clone(), hid.clone()
    later_ids[:, p + 1 :] = (later_ids[:, p + 1 :] + 3) % target.vocab_size
    later_f[:, p:] = torch.randn_like(later_f[:, p:]) * 10
    later_h[:, p:] = torch.randn_like(later_h[:, p:]) * 10
    for a, b in zip(run(later_ids, later_f, later_h), base):
        assert_close(a, b, **ATOL)
    # negative control: the last committed row does matter (features, or last_hidden for MTP-1)
    earlier_f, earlier_h = feats.clone(), hid.clone()
    earlier_f[:, p - 1] = torch.randn_like(earlier_f[:, p - 1]) * 10
    earlier_h[:, p - 1] = torch.randn_like(earlier_h[:, p - 1]) * 10
    assert (run(ids, earlier_f, earlier_h)[0] - base[0]).abs().max() > 1e-3


def test_train_forward_rejects_mismatched_inputs(make_drafter, h):
    d, target = make_drafter("dspark-vanilla")
    ids, feats, hid = h.run_target(target, 8)
    anchors, keep = torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="labels|\\[B, A, 4\\]"):
        d.train_forward(ids, feats, hid, anchors, keep, torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="anchor positions"):
        d.train_forward(ids, feats, hid, torch.tensor([[8]]), keep, torch.zeros(1, 1, 4, dtype=torch.int64))


# ==== gradients and optimisation ================================================================


def _batch(target, gamma: int, seed: int = 0, num_anchors: int = 4):
    """Two sequences whose first 4 tokens are 'prompt' (outside the loss mask); anchors, block
    targets and teacher probabilities as the trainer builds them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (2, 16), generator=g)
    out = target(ids)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, :4] = False
    mask[1, 12:] = False
    anchors, keep = sample_anchors(mask, num_anchors, g)
    labels, ev = block_targets(ids, mask, anchors, keep, gamma)
    p_t = teacher_probs(out.last_hidden, target.lm_head, anchors, gamma)
    return ids, out.features, out.last_hidden, anchors, keep, labels, ev, p_t


def _loss(d, batch, weights: LossWeights):
    ids, feats, hid, anchors, keep, labels, ev, p_t = batch
    out = d.train_forward(ids, feats, hid, anchors, keep, labels, detach_confidence=weights.detach_confidence)
    parts = all_reduce_parts(loss_parts(out.logits, p_t, labels, ev, out.confidence_logits, weights.decay))
    return finalize(parts, weights)


def test_gradients_reach_every_trainable_parameter_and_nothing_else(kind_id, make_drafter):
    d, target = make_drafter(kind_id)
    batch = _batch(target, d.block_size)
    loss, values = _loss(d, batch, ALL_TERMS)
    assert set(values) == set(LOSS_TERMS) | {"loss"}
    loss.backward()
    trainable = {n: p for n, p in d.named_parameters() if p.requires_grad}
    assert trainable
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert d.embed.weight.grad is None and d.lm_head.weight.grad is None
    assert all(p.grad is None for p in target.model.parameters())


def test_detached_confidence_loss_moves_only_the_confidence_head(kind_id, make_drafter):
    d, target = make_drafter(kind_id)
    batch = _batch(target, d.block_size)
    only_conf = LossWeights(ce=0.0, tv=0.0, soft_ce=0.0, conf=1.0, decay=4.0, detach_confidence=True)
    _loss(d, batch, only_conf)[0].backward()
    for n, p in d.named_parameters():
        if not p.requires_grad:
            continue
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == n.startswith("confidence."), n
    # negative control: without the detach the same loss reaches the backbone
    d.zero_grad(set_to_none=True)
    _loss(d, batch, LossWeights(**{**only_conf.__dict__, "detach_confidence": False}))[0].backward()
    moved = [n for n, p in d.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(not n.startswith("confidence.") for n in moved)


def test_optimizer_steps_lower_the_default_loss(kind_id, make_drafter):
    d, target = make_drafter(kind_id)
    weights = LossConfig().resolve(d.cfg.kind)
    batch = _batch(target, d.block_size)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    frozen = (d.embed.weight.clone(), d.lm_head.weight.clone())
    history = []
    for _ in range(6):
        loss, values = _loss(d, batch, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(values)
    first, last = history[0], history[-1]
    # the soft CE of the baselines cannot go below the teacher's entropy (near ln V for a random
    # tiny target): measure the reducible part, loss − α_soft·H(p_t)
    *_, labels, ev, p_t = batch
    entropy = finalize(loss_parts(p_t.log(), p_t, labels, ev, None, weights.decay), weights)[1]["soft_ce"]
    floor = weights.soft_ce * entropy
    assert last["loss"] - floor < 0.95 * (first["loss"] - floor), (floor, [v["loss"] for v in history])
    # the drafting term itself improves, not only the confidence head
    main = {"dspark": "tv", "dflash": "ce", "eagle3": "soft_ce", "mtp1": "soft_ce"}[d.cfg.kind]
    assert last[main] < first[main], (main, [v[main] for v in history])
    assert torch.equal(d.embed.weight, frozen[0]) and torch.equal(d.lm_head.weight, frozen[1])
