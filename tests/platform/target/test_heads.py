"""``load_target_heads`` (what a draft worker loads): the same embedding, LM head and identity as
the full target for every architecture, only those tensors read, and a drafter bound to the heads
drafts exactly what it drafts bound to the full target."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import ARCHS, MASK_ID, drafter_config, randomize
from dspark.drafter_service.layers import target_identity
from dspark.platform.config import TargetConfig
from dspark.platform.target.heads import load_target_heads
from dspark.platform.target.loading import TargetLoadError, load_target


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_equal_the_full_targets(arch, tiny_checkpoints):
    cfg = TargetConfig(path=str(tiny_checkpoints[arch]))
    full, heads = load_target(cfg, with_tokenizer=False), load_target_heads(cfg)
    assert torch.equal(heads.embed_tokens.weight, full.embed_tokens.weight)
    assert torch.equal(heads.lm_head.weight, full.lm_head.weight)
    assert target_identity(heads) == target_identity(full)
    assert (heads.feature_dim, heads.device, heads.dtype) == (full.feature_dim, full.device, full.dtype)
    assert not heads.lm_head.weight.requires_grad and not heads.embed_tokens.weight.requires_grad


def test_demo_target_heads_and_a_drafter_on_them_propose_alike(tiny_demo_target, tmp_path):
    from dspark.drafter_service.checkpoint import load_drafter, save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.sampling import SamplingBatch

    cfg = TargetConfig(path=str(tiny_demo_target.path))
    full, heads = load_target(cfg, with_tokenizer=False), load_target_heads(cfg)
    torch.manual_seed(0)
    d = build_drafter(drafter_config("dspark-vanilla"), full, mask_token_id=MASK_ID)
    randomize(d, 0)
    path = save_drafter(d, tmp_path / "drafter")
    a, b = load_drafter(path, full), load_drafter(path, heads)
    for drafter in (a, b):
        drafter.allocate(2, 64)
    feats = torch.randn(2, 5, full.feature_dim)
    hidden = torch.randn(2, 5, full.hidden_size)
    ids = torch.randint(0, full.vocab_size, (2, 5))
    outs = []
    for drafter in (a, b):
        drafter.append_context(torch.tensor([0, 1]), ids, feats, hidden, torch.tensor([5, 3]))
        block = drafter.propose(torch.tensor([0, 1]), torch.tensor([7, 9]), torch.tensor([5, 3]),
                                SamplingBatch.from_params([(0.0, 0, 1.0)] * 2, [None] * 2))
        outs.append(block)
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].logits, outs[1].logits)


def test_only_the_two_tensors_are_read(tiny_checkpoints, tmp_path, monkeypatch):
    """Every other tensor of the checkpoint may be unreadable: the heads never touch it."""
    from safetensors import safe_open as real_open

    import safetensors

    read: list[str] = []

    class Spy:
        def __init__(self, *a, **k):
            self.fh = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    heads = load_target_heads(TargetConfig(path=str(tiny_checkpoints["qwen3"])))
    assert heads.vocab_size > 0 and 1 <= len(read) <= 2 and all("embed" in n or "lm_head" in n for n in read)


def test_missing_head_tensor_is_a_clear_error(tiny_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["llama"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    for f in dst.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(f).items() if "embed" not in k}
        save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(TargetLoadError, match="no input embedding"):
        load_target_heads(TargetConfig(path=str(dst)))
    assert conf  # the config itself was fine
