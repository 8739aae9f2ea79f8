"""One training worker: the frozen target, the drafter under DeepSpeed, the step loop.

A plain class (no Ray import): :mod:`.launch` runs one per Ray Train worker and passes it the
rank, the device and a ``report`` callback; tests run it directly too.

Step t (optimizer step, 0-based) consumes micro-batches ``t·G .. t·G+G−1`` of this rank's data
stream (G = gradient accumulation), so the data position is a function of t alone and a resumed
run sees exactly the data an uninterrupted one would. Anchors are drawn from a generator seeded
by (seed, t, rank, micro-batch), for the same reason.

Normalisation: every loss term is a weighted mean over the *global* step (all ranks, all G
micro-batches). Denominators depend only on masks, so they are computed and all-reduced before
any forward; each micro-batch then backpropagates ``W·G · Σ_i α_i·num_i / DEN_i`` and DeepSpeed's
1/G (accumulation) and 1/W (data-parallel average) scalings leave exactly the gradient of the
global weighted mean.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dspark.platform.observability.recorders import TrainingMetrics
from dspark.platform.training.objective import (
    LOSS_TERMS,
    Parts,
    all_reduce_parts,
    block_targets,
    expected_acceptance,
    finalize,
    loss_parts,
    metric_parts,
    position_weights,
    sample_anchors,
    teacher_probs,
)
from dspark.platform.training.train_config import TrainConfig

__all__ = ["lr_factor", "deepspeed_config", "WorkerInfo", "DrafterTrainer"]

STATE_NAME = "trainer_state.json"
DS_TAG = "deepspeed"


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up over
    ceil(warmup_ratio·total) steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, use_bf16: bool) -> dict:
    d = cfg.distributed
    out: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        out["gradient_clipping"] = cfg.optim.grad_clip
    if use_bf16:
        out["bf16"] = {"enabled": True}
    return out


@dataclass
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path  # shared by all workers (rank 0 writes logs there)
    restore_dir: Path | None = None  # a checkpoint to resume from
    report: Callable[[dict, Path | None], None] = field(default=lambda metrics, ckpt: None)
    step_hook: Callable[[int], None] = field(default=lambda step: None)  # after each step (fault injection in tests)


def _micro_batches(data, micro: int, seed: int, rank: int, world: int, start: int) -> Iterator[tuple[int, Any]]:
    """(global micro-batch index, batch) from index ``start`` on, epochs chained."""
    spe = data.steps_per_epoch(micro, world)
    idx = start
    while True:
        epoch, within = divmod(idx, spe)
        for batch in data.batches(micro, seed, epoch, rank, world, start_step=within):
            yield idx, batch
            idx += 1


class DrafterTrainer:
    def __init__(self, cfg: TrainConfig, info: WorkerInfo, target_path: Path, data_dir: Path):
        import deepspeed

        from dspark.drafter_service.registry import build_drafter
        from dspark.platform.target.loading import load_target
        from dspark.platform.training.dataset import TrainData

        self.cfg, self.info = cfg, info
        gpu = info.device.type == "cuda"
        self.bf16 = cfg.distributed.precision == "bf16" or (cfg.distributed.precision == "auto" and gpu)
        tcfg = cfg.target.model_copy(update={"device": str(info.device), "dtype": "bfloat16" if self.bf16 else cfg.target.dtype})
        self.target = load_target(tcfg, target_path)
        torch.manual_seed(cfg.seed)  # same initial drafter on every rank
        drafter = build_drafter(cfg.drafter, self.target)
        self.weights = cfg.loss.resolve(cfg.drafter.kind)
        self.data = TrainData(data_dir, max_length=cfg.batch.max_length)
        self.feature_cache = None
        if cfg.data.features == "offline":  # features read from `dspark data cache-features` output
            from dspark.platform.training.feature_cache import FeatureCache

            self.feature_cache = FeatureCache(cfg.data.feature_cache, self.data)
        params = [p for p in drafter.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, o.warmup_ratio, o.min_lr_ratio)
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=drafter, optimizer=optimizer, lr_scheduler=sched, model_parameters=params,
            config=deepspeed_config(cfg, self.bf16), dist_init_required=False,
        )
        if cfg.distributed.target_sharding == "zero3":
            from dspark.platform.training.sharding import shard_target

            self.target_engine = shard_target(self.target, cfg.batch.micro_batch_size, self.bf16)
        from dspark.platform.training.sharding import local_parameter_count

        self.target_local_params = local_parameter_count(self.target.model)  # this worker's share
        self.step = 0
        if info.restore_dir is not None:
            self._restore(Path(info.restore_dir))

    @property
    def drafter(self):
        return self.engine.module

    # ------------------------------------------------------------------------------ stepping
    def _anchors(self, batch, step: int, micro: int):
        g = torch.Generator(device=self.info.device)
        g.manual_seed(((self.cfg.seed * 1_000_003 + step) * 4099 + self.info.rank) * 131 + micro)
        mask = (batch.loss_mask * batch.attention_mask).bool()
        anchors, keep = sample_anchors(mask, self.cfg.loss.num_anchors, g)
        labels, eval_mask = block_targets(batch.input_ids, mask, anchors, keep, self.drafter.block_size)
        return anchors, keep, labels, eval_mask

    def _target_features(self, batch):
        """(features [B, S, L·d], last hidden [B, S, d]) of the batch: a target forward (online)
        or the feature cache (offline)."""
        if self.feature_cache is None:
            out = self.target(batch.input_ids, attention_mask=batch.attention_mask, logits_positions=None)
            return out.features, out.last_hidden
        f, h = self.feature_cache.batch(batch.index.tolist(), batch.input_ids.shape[1])
        dt = self.target.dtype
        return f.to(self.info.device, dt), h.to(self.info.device, dt)

    def _global_den(self, eval_masks: list[torch.Tensor]) -> torch.Tensor:
        """[T] Σw over the whole step, all ranks (a loss term's denominator)."""
        w = position_weights(self.drafter.block_size, self.weights.decay, self.info.device)
        local = sum(((m.float() * w).sum() for m in eval_masks), torch.zeros((), device=self.info.device))
        has_conf = getattr(self.drafter, "confidence", None) is not None
        den = torch.stack([local, local, local, local if has_conf else torch.zeros_like(local)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(den)
        return den

    def train_step(self, stream: Iterator) -> dict:
        """One optimizer step over G micro-batches; returns the step's global metrics."""
        G, W = self.cfg.grad_accum, self.info.world_size
        micro = [next(stream) for _ in range(G)]
        dev = self.info.device
        prepared = []
        for j, (_, batch) in enumerate(micro):
            batch = batch.to(dev)
            prepared.append((batch, *self._anchors(batch, self.step, j)))
        den = self._global_den([p[4] for p in prepared])
        loss_sum = torch.zeros(len(LOSS_TERMS), device=dev)
        metrics: Parts | None = None
        tokens = 0
        for batch, anchors, keep, labels, eval_mask in prepared:
            with torch.no_grad():
                feats, hidden = self._target_features(batch)
                p_t = teacher_probs(hidden, self.target.lm_head, anchors, self.drafter.block_size)
            out = self.engine.module.train_forward(
                batch.input_ids, feats, hidden, anchors, keep, labels,
                detach_confidence=self.weights.detach_confidence,
            )
            parts = loss_parts(out.logits, p_t, labels, eval_mask, out.confidence_logits, self.weights.decay)
            scaled = Parts(LOSS_TERMS, parts.num, den, den.new_zeros(len(LOSS_TERMS)), W * G)
            loss, _ = finalize(scaled, self.weights)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += parts.num.detach()
            conf = out.confidence_logits.detach() if out.confidence_logits is not None else None
            m = metric_parts(expected_acceptance(out.logits.detach(), p_t), eval_mask, conf)
            metrics = m if metrics is None else metrics + m
            tokens += int(batch.attention_mask.sum())
        self.step += 1
        num = loss_sum.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)  # den is global already
        _, values = finalize(Parts(LOSS_TERMS, loss_sum, den).with_totals(num, den, W), self.weights)
        values.update(all_reduce_parts(metrics).values())
        tok = torch.tensor([float(tokens)], device=dev)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tok)
        values["tokens"] = float(tok.item())
        values["lr"] = float(self.scheduler.get_last_lr()[0])
        values["target_local_params"] = self.target_local_params
        values["micro_batches"] = [int(i) for i, _ in micro]
        values["records"] = [int(x) for _, b in micro for x in b.index.tolist()]
        return values

    def fit(self) -> dict:
        """Train to ``cfg.steps``; returns the last step's metrics."""
        cfg, info = self.cfg, self.info
        stream = _micro_batches(self.data, cfg.batch.micro_batch_size, cfg.seed, info.rank, info.world_size,
                                self.step * cfg.grad_accum)
        log = _Logger(info.run_dir, enabled=info.rank == 0, tensorboard=cfg.tensorboard)
        bar = _progress(cfg.steps, self.step, enabled=info.rank == 0)
        # Ray metrics (platform/observability), rank 0 only: the values are global already
        metrics = TrainingMetrics(cfg.name) if info.rank == 0 else None
        last: dict = {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                values = self.train_step(stream)
                values["seconds"] = time.perf_counter() - t0
                values["tokens_per_s"] = values["tokens"] / values["seconds"]
                values["step"] = self.step
                last = values
                if metrics is not None:
                    metrics.step(values)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    log.write(values)
                bar.update(1)
                bar.set_description(f"train loss {values['loss']:.3f} τ_p {values.get('tau_probabilistic', 0):.2f}")
                ckpt = None
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.steps:
                    ckpt = self.save(info.run_dir / "tmp-checkpoints" / f"step-{self.step:08d}-rank-{info.rank}")
                info.report({k: v for k, v in values.items() if isinstance(v, (int, float))}, ckpt)
                info.step_hook(self.step)
        finally:
            bar.close()
            log.close()
        return last

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, out: Path) -> Path:
        """DeepSpeed states (drafter, optimizer, scheduler: each rank its shard) and, from rank 0,
        the trainer state and a loadable drafter checkpoint (``drafter/``)."""
        from dspark.drafter_service.checkpoint import save_drafter

        out.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(out), tag=DS_TAG)
        if self.info.rank == 0:
            (out / STATE_NAME).write_text(json.dumps({"step": self.step, "config": self.cfg.model_dump(mode="json")}, indent=2))
            save_drafter(self.drafter, out / "drafter")
        return out

    def _restore(self, src: Path) -> None:
        # DeepSpeed reads its optimizer/engine shards with torch.load(weights_only=False): they
        # hold Python objects (the DeepSpeed config, param groups), so weights_only cannot be
        # used. This is trusted local state: ``src`` is a checkpoint this trainer wrote under its
        # own run directory (launch.py resumes only from there). Never point a run at checkpoints
        # from elsewhere; the drafter itself is shipped as safetensors (``drafter/``).
        state = json.loads((src / STATE_NAME).read_text())
        load_path, _ = self.engine.load_checkpoint(str(src), tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed state under {src}")
        self.step = int(state["step"])


class _Logger:
    """Rank 0's metrics: JSON lines (``metrics.jsonl``) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.fh = None
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fh = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, values: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(values) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, values["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
    """Rank 0's progress bar; inside a Ray worker, Ray's bar (rendered by the driver)."""
    import ray

    if enabled and ray.is_initialized():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(total=total, desc="train", unit="step")
        if initial:
            bar.update(initial)
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled)
