"""Helpers of the training-data tests: a tiny data config over the tiny demo target."""

from __future__ import annotations

from pathlib import Path

from _helpers import tiny_demo_config

#: seven short code prompts from the first 0.6 MB of the corpus, short answers, shards of 2
TINY_SOURCE = dict(kind="corpus", split="train", num_prompts=7, min_prompt_tokens=8, max_prompt_tokens=24,
                   per_file=2, max_corpus_mb=0.6, seed=0)


def tiny_data_dict(target_path: str | Path, out: str | Path) -> dict:
    return {
        "target": {"path": str(target_path)},
        "demo_target": tiny_demo_config().model_dump(mode="json"),
        "sources": [dict(TINY_SOURCE)],
        "sampling": {"max_new_tokens": 10},
        "min_loss_tokens": 2,
        "shard_size": 2,
        "batch_size": 3,
        "prefill_chunk": 16,
        "max_length": 256,
        "output_dir": str(out),
    }


def data_config(target_path: str | Path, out: str | Path, *overrides: str, **sections):
    """The tiny DataConfig, with dotted overrides ("sampling.temperature=0") and/or whole
    sections replaced (sources=[...])."""
    from dspark.platform.config import apply_overrides, validate_config
    from dspark.platform.training.data_config import DataConfig

    data = {**tiny_data_dict(target_path, out), **sections}
    return validate_config(DataConfig, apply_overrides(data, overrides))


def quiet_generate(cfg, target, target_path, **kw) -> dict:
    from dspark.platform.training.data import generate_data

    return generate_data(cfg, target, target_path, progress=False, log=lambda m: None, **kw)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("shard-*.parquet"))}
