"""Behaviour every drafter kind shares: shapes, frozen copies, greedy/seeded sampling, and the
context cache (ragged appends, truncate, move, batched vs single proposals)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

ATOL = dict(atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_propose_shapes_frozen_copies_and_trainable_params(kind_id, arch, make_drafter, h):
    d, target = make_drafter(kind_id, arch)
    ids, feats, hid = h.run_target(target, 10)
    h.append(d, 1, ids, feats, hid, 0, 10)
    blk = h.propose(d, [1, 0], [7, 8])  # slot 0 is empty
    gamma = 1 if kind_id == "mtp1" else 4
    assert d.block_size == gamma
    assert blk.tokens.shape == (2, gamma) and blk.tokens.dtype == torch.int64
    assert blk.logits.shape == (2, gamma, target.vocab_size) and blk.logits.dtype == torch.float32
    assert blk.confidences.shape == (2, gamma) and blk.confidences.dtype == torch.float32
    assert bool(((blk.confidences > 0) & (blk.confidences < 1)).all())
    assert torch.isfinite(blk.logits).all()
    # embedding and LM head: copies of the target's, frozen
    assert not d.embed.weight.requires_grad and not d.lm_head.weight.requires_grad
    assert torch.equal(d.embed.weight, target.embed_tokens.weight)
    assert torch.equal(d.lm_head.weight, target.lm_head.weight)
    assert d.embed.weight.data_ptr() != target.embed_tokens.weight.data_ptr()
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(("embed.", "lm_head.")) for n in trainable)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_dspark_builds_for_other_targets(arch, make_drafter, h):
    d, target = make_drafter("dspark-vanilla", arch)
    ids, feats, hid = h.run_target(target, 6)
    h.append(d, 0, ids, feats, hid, 0, 6)
    assert h.propose(d, [0], [3]).logits.shape == (1, 4, target.vocab_size)


def test_confidence_head_off_gives_none(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id, confidence_head=False)
    assert h.propose(d, [0], [3]).confidences is None


def test_greedy_tokens_are_argmax_of_returned_logits(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 12)
    h.append(d, 0, ids, feats, hid, 0, 12)
    blk = h.propose(d, [0], [int(ids[0, -1])])
    assert torch.equal(blk.tokens, blk.logits.argmax(-1))


def test_seeded_sampling_repeats(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 8)
    h.append(d, 0, ids, feats, hid, 0, 8)
    h.append(d, 1, ids, feats, hid, 0, 5)
    runs = [h.propose(d, [0, 1], [4, 9], h.seeded(2, seed=7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].logits, runs[1].logits)
    # sampled, not greedy: over many seeds some token differs from the argmax
    draws = torch.stack([h.propose(d, [0], [4], h.seeded(1, seed=s)).tokens[0, 0] for s in range(20)])
    assert len(set(draws.tolist())) > 1


def test_ragged_chunked_appends_equal_one_append(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 12)
    h.append(d, 0, ids, feats, hid, 0, 12)
    # slots 1 and 2 receive the same 12 rows in batched, right-padded, ragged chunks (0 allowed)
    plan = {1: [3, 0, 5, 4], 2: [5, 1, 0, 6]}
    done = {1: 0, 2: 0}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        counts = [plan[s][step] for s in (1, 2)]
        n = max(counts)
        tok = torch.randint(0, target.vocab_size, (2, n), generator=g)  # padding is garbage
        f = 50 * torch.randn(2, n, feats.shape[-1], generator=g)
        hh = 50 * torch.randn(2, n, hid.shape[-1], generator=g)
        for r, s in enumerate((1, 2)):
            a, b = done[s], done[s] + counts[r]
            tok[r, : b - a], f[r, : b - a], hh[r, : b - a] = ids[0, a:b], feats[0, a:b], hid[0, a:b]
            done[s] = b
        d.append_context(torch.tensor([1, 2]), tok, f, hh, torch.tensor(counts))
    assert [d.context_length(s) for s in (0, 1, 2)] == [12, 12, 12]
    blk = h.propose(d, [0, 1, 2], [11, 11, 11])
    assert_close(blk.logits[1], blk.logits[0], **ATOL)
    assert_close(blk.logits[2], blk.logits[0], **ATOL)
    assert torch.equal(blk.tokens[1], blk.tokens[0]) and torch.equal(blk.tokens[2], blk.tokens[0])


def test_truncate_then_reappend(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 12)
    other = torch.randn_like(feats) * 3
    h.append(d, 0, ids, feats, hid, 0, 7)  # reference: never went past 7
    ref7 = h.propose(d, [0], [int(ids[0, 7])])
    h.append(d, 1, ids, other, hid * -2, 0, 12)  # slot 1: junk, rolled back to nothing ...
    d.truncate(1, 0)
    h.append(d, 1, ids, feats, hid, 0, 0)  # (an empty append is a no-op)
    h.append(d, 1, ids, feats, hid, 0, 12)
    d.truncate(1, 7)  # ... then the real 12 rows, rolled back to 7
    assert d.context_length(1) == 7
    assert_close(h.propose(d, [1], [int(ids[0, 7])]).logits, ref7.logits, **ATOL)
    h.append(d, 1, ids, feats, hid, 7, 12)  # re-append rows 7..11
    h.append(d, 0, ids, feats, hid, 7, 12)
    a, b = h.propose(d, [0], [3]), h.propose(d, [1], [3])
    assert_close(b.logits, a.logits, **ATOL)
    with pytest.raises(ValueError):
        d.truncate(1, 13)


def test_move_and_reset_slot(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 9)
    h.append(d, 3, ids, feats, hid, 0, 9)
    before = h.propose(d, [3], [2])
    h.append(d, 0, ids, feats * 0.5, hid, 0, 4)  # dst has old content: dropped by the move
    d.move_slot(3, 0)
    assert d.context_length(0) == 9 and d.context_length(3) == 0
    assert_close(h.propose(d, [0], [2]).logits, before.logits, **ATOL)
    d.reset_slot(0)
    assert d.context_length(0) == 0


def test_batched_propose_equals_each_slot_alone(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 10, batch=3, seed=4)
    for slot, (row, n) in {0: (0, 9), 2: (1, 0), 3: (2, 4)}.items():
        d.append_context(torch.tensor([slot]), ids[row : row + 1, :n], feats[row : row + 1, :n],
                         hid[row : row + 1, :n], torch.tensor([n]))
    slots, anchors = [0, 2, 3], [5, 6, 7]
    # a greedy row and two seeded sampled rows
    from dspark.platform.sampling import SamplingBatch

    def sb(rows):
        params = {0: (0.0, 0, 1.0), 2: (0.9, 0, 1.0), 3: (1.2, 50, 0.9)}
        return SamplingBatch.from_params([params[s] for s in rows], [torch.Generator().manual_seed(s) for s in rows])

    both = h.propose(d, slots, anchors, sb(slots))
    for r, (s, a) in enumerate(zip(slots, anchors)):
        alone = h.propose(d, [s], [a], sb([s]))
        assert_close(both.logits[r], alone.logits[0], **ATOL)
        assert torch.equal(both.tokens[r], alone.tokens[0])
        assert_close(both.confidences[r], alone.confidences[0], **ATOL)


def test_other_slot_appends_do_not_change_a_block(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 16)
    h.append(d, 0, ids, feats, hid, 0, 5)
    before = h.propose(d, [0], [1])
    h.append(d, 1, ids, feats, hid, 0, 16)  # longer context elsewhere: batch padding grows
    after = h.propose(d, [0, 1], [1, 1])
    assert_close(after.logits[0], before.logits[0], **ATOL)
    assert_close(h.propose(d, [0], [1]).logits, before.logits, **ATOL)


def test_context_changes_the_block(kind_id, make_drafter, h):
    """Positive control for the equality tests: the context does matter."""
    d, target = make_drafter(kind_id)
    ids, feats, hid = h.run_target(target, 8)
    h.append(d, 0, ids, feats, hid, 0, 8)
    h.append(d, 1, ids, feats.flip(1), hid.flip(1), 0, 8)
    blk = h.propose(d, [0, 1], [2, 2])
    assert (blk.logits[0] - blk.logits[1]).abs().max() > 1e-3


def test_cache_capacity_and_allocation_errors(kind_id, make_drafter, h):
    d, target = make_drafter(kind_id, max_len=8)
    ids, feats, hid = h.run_target(target, 10)
    with pytest.raises(ValueError, match="max_len"):
        h.append(d, 0, ids, feats, hid, 0, 10)
    with pytest.raises(ValueError, match="positions"):
        d.propose(torch.tensor([0]), torch.tensor([1]), torch.tensor([3]), h.greedy(1))
    from dspark.drafter_service.registry import build_drafter

    bare = build_drafter(h.drafter_config(kind_id), target, mask_token_id=h.MASK_ID)  # never allocated
    with pytest.raises(RuntimeError, match="allocate"):
        h.append(bare, 0, ids, feats, hid, 0, 3)


def test_featureless_target_output_is_refused(make_drafter, h):
    d, target = make_drafter("dspark-vanilla")
    ids = torch.randint(0, 320, (1, 4))
    out = target(ids, with_features=False)  # plain decoding output: features [1, 4, 0]
    with pytest.raises(ValueError, match="target features must be"):
        d.append_context(torch.tensor([0]), ids, out.features, out.last_hidden, torch.tensor([4]))
