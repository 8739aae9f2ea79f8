"""Feature extraction of the frozen target equals Hugging Face's own hidden states, for every
supported architecture, with and without a KV cache."""

from __future__ import annotations

import shutil

import pytest
import torch

from _helpers import ARCHS
from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import TargetLoadError, check_layer_ids, default_layer_ids, load_target


def _reference(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_features_match_output_hidden_states(arch, tiny_checkpoints):
    layer_ids = (-1, 0, 2)
    t = load_target(TargetConfig(path=str(tiny_checkpoints[arch]), layer_ids=layer_ids), with_tokenizer=False)
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    ids = torch.randint(1, t.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    out = t(ids)
    ref = _reference(t.model, ids)
    # hidden_states[0] = embedding output, hidden_states[i + 1] = output of decoder layer i
    expected = torch.cat([ref.hidden_states[i + 1] for i in layer_ids], dim=-1)
    assert out.features.shape == (2, 11, 3 * t.hidden_size)
    torch.testing.assert_close(out.features, expected)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(t.lm_head(out.last_hidden), ref.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_features_with_kv_cache_match_full_pass(arch, tiny_checkpoints):
    from transformers import DynamicCache

    t = load_target(TargetConfig(path=str(tiny_checkpoints[arch]), layer_ids=(1, 2)), with_tokenizer=False)
    ids = torch.randint(1, t.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    full = t(ids)
    cache = DynamicCache(config=t.config)
    first = t(ids[:, :9], past_key_values=cache)
    second = t(ids[:, 9:], past_key_values=first.past_key_values, logits_positions=slice(-1, None))
    assert second.past_key_values.get_seq_length() == 14
    torch.testing.assert_close(torch.cat([first.features, second.features], dim=1), full.features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second.logits, full.logits[:, -1:], atol=1e-5, rtol=1e-4)
    ref = _reference(t.model, ids)
    torch.testing.assert_close(second.features, torch.cat([ref.hidden_states[2][:, 9:], ref.hidden_states[3][:, 9:]], -1), atol=1e-5, rtol=1e-4)


def test_no_logits_requested(tiny_checkpoints):
    t = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    out = t(torch.ones(1, 3, dtype=torch.long), logits_positions=None)
    assert out.logits is None and out.features.shape[-1] == t.feature_dim


def test_dtype_is_configurable(tiny_checkpoints):
    t = load_target(TargetConfig(path=str(tiny_checkpoints["llama"]), dtype="bfloat16"), with_tokenizer=False)
    assert t.dtype == torch.bfloat16
    assert t(torch.ones(1, 4, dtype=torch.long)).features.dtype == torch.bfloat16


def test_final_layer_is_refused(tiny_checkpoints):
    with pytest.raises(TargetLoadError, match="final decoder layer"):
        load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"]), layer_ids=(0, 3)), with_tokenizer=False)
    with pytest.raises(TargetLoadError, match="out of range"):
        check_layer_ids((0, 9), num_layers=4)


def test_default_layer_ids_follow_deepspec():
    assert default_layer_ids(36) == (1, 9, 17, 25, 33)  # Qwen3-4B / 8B
    assert default_layer_ids(40) == (1, 10, 19, 28, 37)  # Qwen3-14B
    for n in range(2, 64):
        ids = default_layer_ids(n)
        assert check_layer_ids(ids, n) == ids and len(ids) >= 1


def test_only_safetensors_are_loaded(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["qwen3"]
    dst = tmp_path / "pickled"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TargetLoadError, match="pickle weights are never loaded"):
        load_target(TargetConfig(path=str(dst)), with_tokenizer=False)


@pytest.mark.parametrize("what", ["missing", "file", "no_config"])
def test_bad_paths_give_clear_errors(what, tmp_path):
    path = tmp_path / "x"
    if what == "file":
        path.write_text("")
    elif what == "no_config":
        path.mkdir()
    with pytest.raises(TargetLoadError, match={"missing": "not found", "file": "not a directory", "no_config": "no config.json"}[what]):
        load_target(TargetConfig(path=str(path)), with_tokenizer=False)


def test_corrupted_safetensors_is_a_clear_error(tiny_checkpoints, tmp_path):
    dst = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoints["qwen3"], dst)
    weights = next(dst.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TargetLoadError, match="cannot load the target weights"):
        load_target(TargetConfig(path=str(dst)), with_tokenizer=False)


def test_remote_code_is_off_by_default(tiny_checkpoints, tmp_path):
    import json

    dst = tmp_path / "custom"
    shutil.copytree(tiny_checkpoints["qwen3"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "my_custom_lm"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TargetLoadError, match="trust_remote_code"):
        load_target(TargetConfig(path=str(dst)), with_tokenizer=False)
