"""DSpark / DFlash specifics: the block mask, the Markov bias inside the returned logits,
non-anticipation, DFlash = no bias, and the mask token."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dspark.drafter_service.providers.dspark import block_attention_mask

ATOL = dict(atol=1e-5, rtol=0)


def _block_hidden(d, slot: int, anchor: int) -> torch.Tensor:
    """h [1, γ, d] of one slot's block, recomputed from the cache through the public pieces."""
    n = d.context_length(slot)
    k, v, _ = d.kv.gather(torch.tensor([slot]))
    pos = n + torch.arange(d.block_size)[None]
    mask = block_attention_mask(torch.tensor([[n]]), k.shape[3], d.block_size)
    return d.backbone(d.embed(d.block_input_ids(torch.tensor([anchor]))), pos, k, v, mask)


def test_block_attention_mask_worked_example():
    m = block_attention_mask(torch.tensor([[2, 3]]), ctx_len=4, block_size=2)[0, 0].int()
    expected = torch.tensor(
        [[1, 1, 0, 0, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 0, 0, 0, 1, 1]] * 2, dtype=torch.int32
    )
    assert torch.equal(m, expected)
    # an empty context still leaves the block itself visible: no fully masked row
    assert block_attention_mask(torch.tensor([[0]]), 0, 3).all()


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_logits_are_base_plus_markov_bias_of_previous_token(block_kind, arch, make_drafter, h):
    d, target = make_drafter(block_kind, arch)
    ids, feats, hid = h.run_target(target, 12)
    h.append(d, 0, ids, feats, hid, 0, 12)
    anchor = int(ids[0, 5])
    for sampling in (h.greedy(1), h.seeded(1, seed=3)):
        blk = h.propose(d, [0], [anchor], sampling)
        with torch.no_grad():
            hb = _block_hidden(d, 0, anchor)
            base = d.lm_head(hb).float()  # U [1, γ, V]
            if d.markov is None:
                assert torch.equal(blk.logits, base)  # DFlash: exactly U
                continue
            prev = torch.cat([torch.tensor([[anchor]]), blk.tokens[:, :-1]], dim=1)  # [anchor, d_1..d_{γ-1}]
            bias = d.markov.block_bias(prev, hb).float()
        assert bias.abs().max() > 1e-3
        assert_close(blk.logits, base + bias, **ATOL)
        if d.markov.kind == "vanilla":  # B(x, ·) = W2 · W1[x]
            assert_close(bias[0, 2], d.markov.w2.weight @ d.markov.w1.weight[prev[0, 2]], **ATOL)


def test_dflash_has_no_markov_head_and_logits_equal_base(make_drafter, h):
    d, target = make_drafter("dflash")
    assert d.markov is None and d.cfg.markov_rank == 0
    assert d.confidence.proj.in_features == target.hidden_size  # no Markov embedding to share
    dsp, _ = make_drafter("dspark-vanilla")
    assert dsp.confidence.proj.in_features == target.hidden_size + 16


def test_block_ignores_context_at_or_after_the_anchor(block_kind, make_drafter, h):
    """The training path (all 16 context rows given, masked at the anchor) equals the cache path
    (only rows < anchor ever given); changing rows >= anchor changes nothing, rows < anchor do."""
    d, target = make_drafter(block_kind)
    ids, feats, hid = h.run_target(target, 16)
    p, anchor = 6, int(ids[0, 6])
    h.append(d, 0, ids, feats, hid, 0, p)
    blk = h.propose(d, [0], [anchor])

    def full_context(f):  # h [1, γ, d] with every context row given, masked at the anchor
        with torch.no_grad():
            k, v = d.project_context(f, torch.arange(16)[None])
            mask = block_attention_mask(torch.tensor([[p]]), 16, d.block_size)
            pos = p + torch.arange(d.block_size)[None]
            return d.backbone(d.embed(d.block_input_ids(torch.tensor([anchor]))), pos, k, v, mask)

    hb = full_context(feats)
    later = feats.clone()
    later[:, p:] = torch.randn_like(later[:, p:]) * 10
    earlier = feats.clone()
    earlier[:, p - 1] = torch.randn_like(earlier[:, p - 1]) * 10
    assert_close(full_context(later), hb, **ATOL)
    assert (full_context(earlier) - hb).abs().max() > 1e-3
    with torch.no_grad():
        expected = d.lm_head(hb).float()
        if d.markov is not None:
            prev = torch.cat([torch.tensor([[anchor]]), blk.tokens[:, :-1]], dim=1)
            expected = expected + d.markov.block_bias(prev, hb).float()
    assert_close(blk.logits, expected, **ATOL)


def test_block_input_is_anchor_then_masks(make_drafter):
    d, _ = make_drafter("dspark-vanilla")
    assert d.block_input_ids(torch.tensor([9, 11])).tolist() == [[9, 5, 5, 5], [11, 5, 5, 5]]


def test_mask_token_from_the_demo_tokenizer(tiny_demo_target, h):
    from dspark.drafter_service.providers import DrafterBuildError
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target

    target = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    d = build_drafter(h.drafter_config("dspark-vanilla"), target)
    assert d.mask_token_id == target.tokenizer.convert_tokens_to_ids("<|mask|>") == 1
    d.allocate(2, 32)
    ids = torch.tensor([target.tokenizer("def f(x):\n    return x").input_ids])
    out = target(ids)
    d.append_context(torch.tensor([0]), ids, out.features, out.last_hidden, torch.tensor([ids.shape[1]]))
    assert h.propose(d, [0], [int(ids[0, -1])]).tokens.shape == (1, 4)
    assert build_drafter(h.drafter_config("dspark-vanilla"), target, mask_token_id=1).mask_token_id == 1
    with pytest.raises(DrafterBuildError, match="disagrees"):
        build_drafter(h.drafter_config("dspark-vanilla"), target, mask_token_id=2)
    with pytest.raises(DrafterBuildError, match="has no token '<\\|nothere\\|>'"):
        build_drafter(h.drafter_config("dspark-vanilla", mask_token="<|nothere|>"), target)
    # the autoregressive baselines need no mask token
    assert build_drafter(h.drafter_config("eagle3", mask_token="<|nothere|>"), target).block_size == 4


def test_missing_mask_token_is_a_clear_error(tiny_targets, h):
    from dspark.drafter_service.providers import DrafterBuildError
    from dspark.drafter_service.registry import build_drafter

    target = tiny_targets("qwen3")
    with pytest.raises(DrafterBuildError, match="no tokenizer.*mask_token_id"):
        build_drafter(h.drafter_config("dspark-vanilla"), target)
    with pytest.raises(DrafterBuildError, match="outside the target vocabulary"):
        build_drafter(h.drafter_config("dspark-vanilla"), target, mask_token_id=target.vocab_size)
