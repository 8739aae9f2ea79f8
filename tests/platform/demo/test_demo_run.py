"""`dspark demo` end to end at fixture size, as users run it (the installed console script): the
tiny demo target, a recipe that generates 8 answers and trains 3 steps, the repository's
serve-local.yaml started as a disaggregated and a plain app, a sweep at C = 1, 2 through the
openai client, the summary, the plots; then the drafter cache is found by its key."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _helpers import tiny_demo_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
DSPARK = shutil.which("dspark", path=str(Path(sys.executable).parent)) or "dspark"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_demo(tmp: Path) -> Path:
    data = {"sources": [{"kind": "corpus", "split": "train", "num_prompts": 8, "max_corpus_mb": 0.6}],
            "sampling": {"max_new_tokens": 16}, "shard_size": 8, "min_loss_tokens": 4,
            "output_dir": str(tmp / "unused")}
    train = {"name": "tiny-demo", "output_dir": str(tmp / "runs"), "steps": 3, "log_every": 1, "tensorboard": False,
             "seed": 3, "drafter": {"kind": "dspark", "block_size": 3, "num_layers": 1, "markov_rank": 8},
             "loss": {"num_anchors": 6}, "data": {"path": str(tmp / "data"), "generate_config": str(tmp / "data.yaml")},
             "batch": {"global_batch_size": 2, "micro_batch_size": 1, "max_length": 48},
             "distributed": {"num_workers": 1}, "checkpoint": {"every_steps": 3}}
    demo = {"demo_target": tiny_demo_config().model_dump(mode="json"),
            "engine": {"max_batch_size": 2, "max_model_len": 160},
            "generate": {"prompt": "def main():\n", "max_new_tokens": 8},
            "train": {"recipe": str(tmp / "train.yaml")},
            "serve": {"config": str(ROOT / "clusters" / "serve-local.yaml"), "port": _free_port()},
            "sweep": {"concurrency": [1, 2], "max_tokens": 6, "min_requests": 2},
            "output_dir": str(tmp / "out")}
    for name, obj in (("data.yaml", data), ("train.yaml", train), ("demo.yaml", demo)):
        (tmp / name).write_text(yaml.safe_dump(obj))
    return tmp / "demo.yaml"


def test_demo_trains_serves_sweeps_and_caches(tiny_demo_target, demo_cache, tmp_path, monkeypatch):
    from dspark.platform.config import DemoConfig, load_config
    from dspark.platform.demo.drafter import find_drafter

    cfg_path = write_tiny_demo(tmp_path)
    env = {**os.environ, "DSPARK_CACHE": str(demo_cache), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([DSPARK, "demo", "--config", str(cfg_path)], capture_output=True, text=True, timeout=600,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "first run:" in r.stderr and "train the drafter" in r.stderr  # the estimate comes first
    lines = r.stdout.splitlines()
    served = [ln for ln in lines if " tokens in " in ln and "tokens/s" in ln]  # what the quick start records
    assert len(served) == 2 and "plain decoding" in served[-1] and "speculative, disaggregated" in served[0]
    assert "same text as plain" in served[0]
    assert any(ln.startswith("speculative vs plain: ") and "C=1" in ln and "C=2" in ln for ln in lines)

    out = tmp_path / "out"
    for f in ("demo.png", "serve.png", "summary.md", "summary.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    assert [(row["concurrency"], row["variant"]) for row in s["rows"]] == [(1, "disaggregated"), (2, "disaggregated")]
    for row in s["rows"]:
        assert row["mismatches"] == 0  # greedy: lossless
        assert row["spec"]["failed"] == 0 and row["plain"]["failed"] == 0
        assert row["spec"]["tokens"] == row["spec"]["requests"] * 6
        assert row["spec"]["tokens_per_step"] >= 1.0
    # the scheduler actor was up: budgets were sampled at some concurrency
    assert any(row["budget"] and row["budget"]["samples"] > 0 for row in s["rows"])
    assert s["drafter"]["source"] == "trained" and set(s["seconds"]) >= {"target", "drafter", "serve_start", "sweep", "total"}

    # a second run would reuse the drafter: found in the cache under the recipe's key, no training
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSPARK_CACHE", str(demo_cache))
    found = find_drafter(load_config(DemoConfig, cfg_path))
    assert found is not None and found.source == "cache"
    assert found.path == Path(s["drafter"]["path"])
