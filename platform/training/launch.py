"""Ray Train glue: run :class:`~dspark.platform.training.trainer.DrafterTrainer` on every worker.

The driver resolves the target checkpoint and the data set (generating it first when the config
says how), then starts a ``TorchTrainer`` whose per-worker function reads only its config dict.
Checkpoints: every worker reports its DeepSpeed shard directory through ``ray.train.report``;
Ray Train gathers them into one checkpoint under ``<run>/ray/``. A worker failure restarts the
group from the newest checkpoint (``max_failures``), and rerunning the same command resumes a
run whose newest checkpoint is older than ``steps`` (the data order and anchors are functions of
the step, so the result equals an uninterrupted run).

The final drafter is copied to ``<run>/drafter`` (a normal drafter checkpoint directory).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark.platform.training.train_config import TrainConfig

__all__ = ["TrainResult", "run_dir_of", "prepare_inputs", "run_training", "train_loop_per_worker"]

#: fault injection for tests (read on the driver): "STEP:MARKER_FILE" makes rank 0 raise after
#: optimizer step STEP, once (the marker file records that it happened); "STEP:MARKER_FILE:kill"
#: kills rank 0's process there instead (SIGKILL: no exception, no cleanup)
FAIL_ENV = "DSPARK_TRAIN_FAIL_AFTER_STEP"


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    drafter_dir: Path
    steps: int
    metrics: dict


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / cfg.name


def prepare_inputs(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(target checkpoint dir, data dir) on the driver: builds the demo target and generates the
    data set when needed."""
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.training.data_io import read_manifest

    target_path = resolve_target_path(cfg.target.path, cfg.demo_target, log=log)
    data_dir = Path(cfg.data.path).expanduser().resolve()
    complete = False
    if (data_dir / "manifest.json").is_file():
        from dspark.platform.training.data import DATA_FORMAT

        complete = bool(read_manifest(data_dir, DATA_FORMAT).get("complete"))
    if not complete:
        if cfg.data.generate_config is None:
            from dspark.platform.training.data_io import DataError

            raise DataError(f"{data_dir} holds no complete data set; run `dspark data generate` or set data.generate_config")
        from dspark.platform.config import load_config
        from dspark.platform.target.loading import load_target
        from dspark.platform.training.data import generate_data
        from dspark.platform.training.data_config import DataConfig

        dcfg = load_config(DataConfig, cfg.data.generate_config, (f"output_dir={data_dir}",))
        dpath = resolve_target_path(dcfg.target.path, dcfg.demo_target, log=log)
        if Path(dpath).resolve() != Path(target_path).resolve():
            raise ValueError(f"data.generate_config uses target {dpath}, the run trains against {target_path}")
        log(f"generating training data into {data_dir}")
        generate_data(dcfg, load_target(dcfg.target, dpath), dpath, log=log)
    return Path(target_path), data_dir


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry: everything comes from ``config`` (JSON-able)."""
    import ray.train
    import ray.train.torch

    from dspark.platform.training.trainer import DrafterTrainer, WorkerInfo

    cfg = TrainConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_dir = Path(config["run_dir"])

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        if ckpt_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # Ray Train has persisted it

    fail = config.get("fail_after_step") or ""

    def step_hook(step: int) -> None:
        if fail and rank == 0:
            at, marker = fail.split(":", 1)
            kill = marker.endswith(":kill")  # the process dies at once (SIGKILL) instead of raising
            marker = marker.removesuffix(":kill")
            if step == int(at) and not Path(marker).exists():
                Path(marker).write_text("failed once")
                if kill:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure after step {step}")

    ckpt = ray.train.get_checkpoint()
    restore = ckpt.to_directory() if ckpt is not None else None
    info = WorkerInfo(rank, ctx.get_world_size(), ray.train.torch.get_device(), run_dir,
                      Path(restore) if restore else None, report, step_hook)
    DrafterTrainer(cfg, info, Path(config["target_path"]), Path(config["data_dir"])).fit()


def _latest_checkpoint(storage: Path, name: str):
    """The newest checkpoint of an earlier run of ``name`` (to resume), or None."""
    from ray.train import Checkpoint

    best = None
    root = storage / name
    if root.is_dir():
        for d in root.glob("checkpoint_*"):
            state = d / "trainer_state.json"
            if state.is_file():
                step = json.loads(state.read_text())["step"]
                if best is None or step > best[0]:
                    best = (step, d)
    return (best[0], Checkpoint.from_directory(str(best[1]))) if best else (0, None)


def run_training(cfg: TrainConfig, *, max_failures: int = 0, log: Callable[[str], None] = print) -> TrainResult:
    """Train on Ray (starting a local Ray instance unless one is running or an address is set)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    target_path, data_dir = prepare_inputs(cfg, log)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    storage = run_dir / "ray"
    done_step, resume = _latest_checkpoint(storage, "train")
    if resume is not None and done_step >= cfg.steps:  # finished earlier: nothing to train
        log(f"{cfg.name} already trained to step {done_step}; reusing its final checkpoint")
        return _finish(run_dir, Path(resume.path), _last_metrics(run_dir))
    if resume is not None:
        log(f"resuming {cfg.name} from step {done_step}")
    if not ray.is_initialized():
        if cfg.distributed.address:
            ray.init(address=cfg.distributed.address)
        else:
            n = max(2, int(cfg.distributed.num_workers * cfg.distributed.cpus_per_worker) + 1)
            ray.init(num_cpus=n, include_dashboard=False, object_store_memory=200 * 2**20)
    d = cfg.distributed
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                           "target_path": str(target_path), "data_dir": str(data_dir),
                           "fail_after_step": os.environ.get(FAIL_ENV)},  # read on the driver: workers do not inherit it
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RunConfig(name="train", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=max_failures)),
        resume_from_checkpoint=resume,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    return _finish(run_dir, Path(ckpt.to_directory()), dict(result.metrics or {}))


def _last_metrics(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _finish(run_dir: Path, src: Path, metrics: dict) -> TrainResult:
    """Copy the checkpoint's drafter to ``<run>/drafter`` (a normal drafter checkpoint)."""
    state = json.loads((src / "trainer_state.json").read_text())
    final = run_dir / "drafter"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(src / "drafter", final)
    return TrainResult(run_dir, final, int(state["step"]), metrics)
