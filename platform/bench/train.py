"""``dspark bench train``: training throughput of one run config with 1, 2, … workers.

Each worker count trains the same config (same global batch, so more workers means less
gradient accumulation per worker) for a few steps in a fresh run directory; the figure is the
median tokens/s over the steps after the first ``warmup`` (DeepSpeed and Ray start-up excluded).
Scaling efficiency = tokens/s with W workers ÷ (W × tokens/s with 1 worker).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark.platform.training.train_config import TrainConfig

__all__ = ["TrainBenchRow", "run_train_bench", "render_markdown"]


@dataclass(frozen=True)
class TrainBenchRow:
    workers: int
    tokens_per_s: float  # median over the timed steps, all workers together
    step_s: float  # median seconds per optimizer step
    steps_timed: int


def _median_rows(metrics_file: Path, warmup: int) -> tuple[float, float, int]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        raise RuntimeError(f"no step after the {warmup} warm-up steps in {metrics_file}")
    return (statistics.median(r["tokens_per_s"] for r in timed), statistics.median(r["seconds"] for r in timed), len(timed))


def run_train_bench(cfg: TrainConfig, workers: list[int], steps: int, warmup: int = 2,
                    log: Callable[[str], None] = print) -> list[TrainBenchRow]:
    from dspark.platform.training.launch import run_training

    rows = []
    with tempfile.TemporaryDirectory(prefix="dspark-bench-train-") as tmp:
        for w in workers:
            run = cfg.model_copy(update={
                "name": f"bench-{w}w", "output_dir": tmp, "steps": steps, "log_every": 1, "tensorboard": False,
                "distributed": cfg.distributed.model_copy(update={"num_workers": w}),
                "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": steps}),
            })
            TrainConfig.model_validate(run.model_dump())  # batch arithmetic must hold for w workers too
            log(f"training {steps} steps with {w} worker(s)")
            res = run_training(run, log=log)
            rows.append(TrainBenchRow(w, *_median_rows(res.run_dir / "metrics.jsonl", warmup)))
    return rows


def render_markdown(rows: list[TrainBenchRow]) -> str:
    from dspark.platform.bench.report import markdown_table

    base = next((r for r in rows if r.workers == 1), None)
    table = []
    for r in rows:
        eff = f"{r.tokens_per_s / (r.workers * base.tokens_per_s):.0%}" if base else "—"
        table.append([r.workers, f"{r.tokens_per_s:.0f}", f"{r.step_s:.2f}", eff, r.steps_timed])
    return markdown_table(["workers", "tokens/s", "s/step", "scaling efficiency", "steps timed"], table)
