"""Drafter checkpoints (save/load round trip, refusals) and the registry."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.drafter_service.checkpoint import CONFIG_NAME, WEIGHTS_NAME, DrafterLoadError, load_drafter, save_drafter
from dspark.drafter_service.registry import UnknownDrafterKind, build_drafter, kinds, register


def test_round_trip_gives_identical_proposals(kind_id, make_drafter, h, tmp_path):
    from safetensors.torch import load_file

    d, target = make_drafter(kind_id)
    save_drafter(d, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["drafter"]["kind"] == d.cfg.kind
    assert meta["target"]["vocab_size"] == 320 and meta["target"]["hidden_size"] == 64
    assert meta["target"]["layer_ids"] == list(target.layer_ids)
    assert meta["target"]["mask_token_id"] == (h.MASK_ID if kind_id in ("dspark-vanilla", "dspark-gated", "dspark-rnn", "dflash") else None)
    assert meta["dims"]["num_heads"] == 4
    saved = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert saved and not any(k.startswith(("embed.", "lm_head.")) for k in saved)

    e = load_drafter(tmp_path / "ckpt", target)
    assert type(e) is type(d) and e.block_size == d.block_size and e.cfg == d.cfg
    assert not e.embed.weight.requires_grad and torch.equal(e.lm_head.weight, target.lm_head.weight)
    for (n1, p1), (n2, p2) in zip(d.state_dict().items(), e.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids, feats, hid = h.run_target(target, 9)
    for x in (d, e):
        x.allocate(2, 16)
        h.append(x, 1, ids, feats, hid, 0, 9)
    a = h.propose(d, [1, 0], [3, 4], h.seeded(2, seed=11))
    b = h.propose(e, [1, 0], [3, 4], h.seeded(2, seed=11))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)


def _target_with(arch: str, **cfg_over):
    from transformers import AutoModelForCausalLM

    from _helpers import tiny_hf_config
    from dspark.platform.target.loading import FrozenTarget

    cfg = tiny_hf_config(arch, vocab_size=cfg_over.pop("vocab_size", 320))
    for k, v in cfg_over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return FrozenTarget(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vocab_size=384), "vocab_size=320.*vocab_size=384"),
        (dict(hidden_size=96), "hidden_size=64.*hidden_size=96"),
    ],
)
def test_mismatched_target_is_refused(change, message, make_drafter, tmp_path):
    d, _ = make_drafter("dspark-vanilla")
    save_drafter(d, tmp_path)
    with pytest.raises(DrafterLoadError, match=message):
        load_drafter(tmp_path, _target_with("qwen3", **change))


def test_other_feature_layers_are_refused(make_drafter, tiny_checkpoints, tmp_path):
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target

    d, _ = make_drafter("eagle3")
    save_drafter(d, tmp_path)
    other = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"]), layer_ids=(0, 2)), with_tokenizer=False)
    with pytest.raises(DrafterLoadError, match=r"layer_ids=\[1, 2\].*layer_ids=\[0, 2\]"):
        load_drafter(tmp_path, other)


def test_mask_token_mismatch_and_missing_files(make_drafter, tmp_path):
    d, target = make_drafter("dspark-rnn")
    save_drafter(d, tmp_path / "c")
    assert load_drafter(tmp_path / "c", target, mask_token_id=5).mask_token_id == 5
    with pytest.raises(DrafterLoadError, match="mask_token_id=5"):
        load_drafter(tmp_path / "c", target, mask_token_id=6)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DrafterLoadError, match="not a drafter checkpoint.*pickle"):
        load_drafter(tmp_path / "p", target)


def test_registry_lists_the_four_kinds_and_rejects_unknown(tiny_targets, h):
    from dspark.platform.config import DrafterConfig

    assert set(kinds()) >= {"dspark", "dflash", "eagle3", "mtp1"}
    bogus = DrafterConfig.model_construct(**{**h.drafter_config("eagle3").model_dump(), "kind": "medusa"})
    with pytest.raises(UnknownDrafterKind, match="unknown drafter kind 'medusa'.*dflash, dspark, eagle3, mtp1"):
        build_drafter(bogus, tiny_targets("qwen3"))
    with pytest.raises(ValueError, match="already registered"):
        register("dspark")(lambda cfg, target, mask: None)


def test_dflash_is_the_dspark_provider(tiny_targets, h):
    from dspark.drafter_service.providers.dspark import DSparkDrafter

    d = build_drafter(h.drafter_config("dflash"), tiny_targets("qwen3"), mask_token_id=h.MASK_ID)
    assert type(d) is DSparkDrafter and d.markov is None
    m = build_drafter(h.drafter_config("mtp1", block_size=7), tiny_targets("qwen3"))
    assert m.block_size == 1 and m.cfg.block_size == 1
