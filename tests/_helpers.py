"""Test helpers shared by several test modules (tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

ARCHS = ("qwen3", "qwen3_moe", "llama", "deepseek_v3")


def tiny_hf_config(arch: str, vocab_size: int = 320, num_layers: int = 4):
    """A few-hundred-thousand-parameter config of each supported architecture."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, norm_topk_prob=True)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
        )
    raise ValueError(arch)


def save_tiny_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch))
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(target, prompt: list[int], n: int) -> list[int]:
    """The target's own ``generate(do_sample=False)`` continuation (no stop token)."""
    import torch

    ids = torch.tensor([prompt])
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths (ids >= 2, clear of the special tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def tiny_demo_config(**kw):
    from dspark.platform.config import DemoTargetConfig

    base = dict(vocab_size=400, hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32,
                intermediate_size=128, seq_len=64, batch_size=4, steps=12, warmup_steps=2, val_batches=2,
                max_corpus_mb=0.6, max_position=512, threads=1)
    base.update(kw)
    return DemoTargetConfig(**base)


# -- drafters -------------------------------------------------------------------------------
MASK_ID = 5  # the random tiny checkpoints have no tokenizer: the mask id is passed explicitly

#: (test id, DrafterConfig fields) for every kind; dspark once per Markov head variant
KINDS = [
    ("dspark-vanilla", dict(kind="dspark", markov_head_type="vanilla")),
    ("dspark-gated", dict(kind="dspark", markov_head_type="gated")),
    ("dspark-rnn", dict(kind="dspark", markov_head_type="rnn")),
    ("dflash", dict(kind="dflash", markov_rank=0)),
    ("eagle3", dict(kind="eagle3")),
    ("mtp1", dict(kind="mtp1")),
]
KIND_IDS = [k for k, _ in KINDS]
BLOCK_KINDS = KIND_IDS[:4]


def drafter_config(kind_id: str, **over):
    from dspark.platform.config import DrafterConfig

    base = dict(block_size=4, num_layers=2, markov_rank=16)
    base.update(dict(KINDS)[kind_id])
    base.update(over)
    return DrafterConfig(**base)


def randomize(drafter: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Redraw every trainable parameter (norm gains around 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "norm." in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


# -- served apps ------------------------------------------------------------------------------
def wait_http(url: str, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200 (a Serve app's /health), or raise ``TimeoutError``."""
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
