"""Trainer pieces that need no Ray: the lr schedule, the DeepSpeed config, the run schema."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from dspark.platform.training.train_config import TrainConfig
from dspark.platform.training.trainer import deepspeed_config, lr_factor


def test_lr_warmup_then_cosine():
    total, warm = 100, 0.04  # 4 warm-up steps
    assert [lr_factor(s, total, warm, 0.0) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, total, warm, 0.0) == pytest.approx(1.0)
    mid = 4 + (100 - 4) // 2
    assert lr_factor(mid, total, warm, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warm, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0.0, 0.0) == pytest.approx(1.0)
    vals = [lr_factor(s, total, warm, 0.0) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warm-up
    assert not any(math.isnan(v) for v in vals)


def test_batch_arithmetic_and_deepspeed_config():
    cfg = TrainConfig(data={"path": "x"}, batch={"global_batch_size": 16, "micro_batch_size": 2},
                      distributed={"num_workers": 2, "zero_stage": 2}, optim={"grad_clip": 0.5})
    assert cfg.grad_accum == 4
    ds = deepspeed_config(cfg, use_bf16=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5 and "bf16" not in ds
    assert deepspeed_config(cfg, use_bf16=True)["bf16"] == {"enabled": True}


def test_bad_run_configs_are_refused_with_reasons():
    with pytest.raises(ValidationError, match="multiple of"):
        TrainConfig(data={"path": "x"}, batch={"global_batch_size": 6, "micro_batch_size": 4}, distributed={"num_workers": 2})
    with pytest.raises(ValidationError, match="feature_cache"):
        TrainConfig(data={"path": "x", "features": "offline"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrainConfig(data={"path": "x"}, optim={"learning_rate": 1.0})
