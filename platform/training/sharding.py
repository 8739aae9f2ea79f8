"""Partitioning the frozen target across data-parallel workers (ZeRO-3 parameter partitioning).

A target too large for one device is held 1/W per worker: DeepSpeed's ZeRO-3 engine (no
optimizer: inference only) registers hooks on every submodule that all-gather a module's
parameters just before it runs and release them after, so ``FrozenTarget.forward`` (which calls
the decoder and LM head modules directly) works unchanged, at the cost of one all-gather per
layer per forward. Every worker must run the same number of target forwards per step (the
trainer guarantees it: G micro-batches each), or the collectives would deadlock.

The drafter copies the embedding and LM head *before* partitioning (build the drafter first).
"""

from __future__ import annotations

from typing import Any

__all__ = ["shard_target", "local_parameter_count"]


def shard_target(target: Any, micro_batch_size: int, bf16: bool) -> Any:
    """Partition ``target.model``'s parameters in place; returns the DeepSpeed engine (keep it
    referenced: it owns the hooks)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=target.model, config=config, dist_init_required=False)
    engine.module.eval()
    return engine


def local_parameter_count(module: Any) -> int:
    """Parameters this worker actually holds (ZeRO-3 partitions report their local shard)."""
    total = 0
    for p in module.parameters():
        ds = getattr(p, "ds_tensor", None)
        total += ds.numel() if ds is not None else p.numel()
    return total
