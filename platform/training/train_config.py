"""The schema of ``dspark train CONFIG.yaml``: one strict pydantic model, YAML as data only.

Batch arithmetic: every optimizer step consumes ``global_batch_size`` sequences =
``micro_batch_size × gradient accumulation × num_workers``; the accumulation count is derived
(:attr:`TrainConfig.grad_accum`) and the sizes must divide evenly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dspark.platform.config import DemoTargetConfig, DrafterConfig, StrictModel, TargetConfig
from dspark.platform.training.objective import LossConfig

__all__ = [
    "OptimConfig", "BatchConfig", "DistributedConfig", "CheckpointConfig", "TrainDataConfig", "TrainConfig",
]


class OptimConfig(StrictModel):
    """AdamW with linear warm-up then cosine decay (DeepSpec's recipe)."""

    lr: float = Field(6e-4, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_ratio: float = Field(0.04, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")


class BatchConfig(StrictModel):
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, all workers together.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward on one worker.")
    max_length: int = Field(512, ge=8, description="Sequences are cut to this many tokens.")


class DistributedConfig(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(False, description="One GPU per worker; NCCL; bf16 by default.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage for the drafter's states.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    target_sharding: Literal["none", "zero3"] = Field(
        "none", description="zero3: partition the frozen target's parameters across workers (ZeRO-3 "
        "parameter partitioning) for targets that do not fit one device.",
    )
    address: str | None = Field(None, description="Ray cluster address (None = start/attach locally).")


class CheckpointConfig(StrictModel):
    every_steps: int = Field(50, ge=1, description="Save a Ray Train checkpoint every N optimizer steps.")
    keep: int = Field(2, ge=1, description="Checkpoints kept (the newest).")


class TrainDataConfig(StrictModel):
    path: str = Field(..., min_length=1, description="Directory made by `dspark data generate`.")
    generate_config: str | None = Field(
        None, description="A `dspark data generate` YAML: when `path` holds no complete data set, "
        "it is generated first with this config (so one command reproduces a run).",
    )
    features: Literal["online", "offline"] = Field(
        "online", description="online: the frozen target runs in each worker; offline: read a feature cache.",
    )
    feature_cache: str | None = Field(None, description="Feature cache directory (features: offline).")

    @model_validator(mode="after")
    def _check(self) -> "TrainDataConfig":
        if self.features == "offline" and not self.feature_cache:
            raise ValueError("features: offline needs feature_cache")
        return self


class TrainConfig(StrictModel):
    """A drafter training run."""

    name: str = Field("dspark-demo", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Run name.")
    output_dir: str = Field("runs", description="Runs go to <output_dir>/<name>/ (checkpoints, logs, final drafter).")
    seed: int = Field(42, ge=0, description="Seeds initialisation, data order and anchor sampling.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files.")
    target: TargetConfig = Field(default_factory=TargetConfig)
    demo_target: DemoTargetConfig = Field(default_factory=DemoTargetConfig)
    drafter: DrafterConfig = Field(default_factory=DrafterConfig)
    loss: LossConfig = Field(default_factory=LossConfig, description="Objective; unset weights = the drafter kind's defaults.")
    data: TrainDataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainConfig":
        per_step = self.batch.micro_batch_size * self.distributed.num_workers
        if self.batch.global_batch_size % per_step:
            raise ValueError(
                f"batch.global_batch_size ({self.batch.global_batch_size}) must be a multiple of "
                f"micro_batch_size × num_workers ({per_step})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch.global_batch_size // (self.batch.micro_batch_size * self.distributed.num_workers)
