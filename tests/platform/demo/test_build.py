"""The demo-target recipe at fixture size: a real HF checkpoint that round-trips and generates."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import tiny_demo_config
from dspark.platform.config import GenerateConfig, TargetConfig
from dspark.platform.demo.build import MANIFEST, build_demo_target, demo_target_dir
from dspark.platform.demo.corpus import split_of
from dspark.platform.target.generate import PromptTooLongError, generate_completion
from dspark.platform.target.loading import load_target


def test_checkpoint_round_trips_through_auto_classes(tiny_demo_target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_demo_target.path
    assert tiny_demo_target.built
    assert any(path.glob("*.safetensors")) and not any(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.eos_token == "<|endoftext|>" and tok.mask_token == "<|mask|>"
    assert tok.convert_tokens_to_ids("<|mask|>") == 1
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("import os\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1].item() == tok.eos_token_id


def test_manifest_records_the_build(tiny_demo_target):
    m = json.loads((tiny_demo_target.path / MANIFEST).read_text())
    assert m["validation_loss"] > 0 and m["seconds"]["total"] > 0
    assert m["config"] == tiny_demo_config().model_dump(mode="json")
    assert m["test_files"] and all(split_of(p) == "test" for p in m["test_files"])
    # trained on a few batches, the model is already far better than uniform over the vocabulary
    assert m["validation_loss"] < torch.log(torch.tensor(400.0)).item()


def test_cache_is_reused_and_keyed_by_config(tiny_demo_target, demo_cache):
    again = build_demo_target(tiny_demo_config(), demo_cache, progress=False, log=lambda m: None)
    assert not again.built and again.path == tiny_demo_target.path
    assert demo_target_dir(tiny_demo_config(seed=1), demo_cache) != tiny_demo_target.path
    assert "-moe-" in demo_target_dir(tiny_demo_config(moe=True), demo_cache).name


def test_build_is_deterministic(tiny_demo_target, tmp_path):
    from safetensors.torch import load_file

    other = build_demo_target(tiny_demo_config(), tmp_path, progress=False, log=lambda m: None)
    a = load_file(next(tiny_demo_target.path.glob("*.safetensors")))
    b = load_file(next(other.path.glob("*.safetensors")))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tiny_demo_target.path / "tokenizer.json").read_text() == (other.path / "tokenizer.json").read_text()


def test_stale_partial_builds_are_cleaned(demo_cache, tmp_path):
    cfg = tiny_demo_config(steps=3)
    out = demo_target_dir(cfg, tmp_path)
    stale = out.parent / f".{out.name}.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    info = build_demo_target(cfg, tmp_path, progress=False, log=lambda m: None)
    assert info.built and not stale.exists()


def test_moe_variant_builds_and_loads(tmp_path):
    cfg = tiny_demo_config(moe=True, steps=4, num_experts=4, experts_per_token=2, moe_intermediate_size=32)
    info = build_demo_target(cfg, tmp_path, progress=False, log=lambda m: None)
    assert info.manifest["architecture"] == "Qwen3MoeForCausalLM"
    t = load_target(TargetConfig(path=str(info.path)))
    out = t(torch.tensor([[5, 6, 7]]))
    assert out.features.shape == (1, 3, len(t.layer_ids) * t.hidden_size)


def test_generate_completion_matches_hf_greedy(tiny_demo_target):
    t = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    c = generate_completion(t, GenerateConfig(prompt="class A:\n", max_new_tokens=12))
    ids = t.tokenizer("class A:\n", return_tensors="pt").input_ids
    ref = t.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert list(c.token_ids) == ref
    assert c.tokens_per_second > 0 and c.prompt_tokens == ids.shape[1]
    with pytest.raises(PromptTooLongError, match="context length"):
        generate_completion(t, GenerateConfig(prompt="x " * 600, max_new_tokens=8))


def test_seeded_sampling_repeats(tiny_demo_target):
    t = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    g = GenerateConfig(prompt="import ", max_new_tokens=10, temperature=1.0, seed=7)
    assert generate_completion(t, g).token_ids == generate_completion(t, g).token_ids
