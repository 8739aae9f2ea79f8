"""Drafter training on Ray Train + DeepSpeed with 2 CPU workers (gloo) on fixture targets:
a dense run end to end, the MoE target partitioned with ZeRO-3 (same losses as unpartitioned),
and kill-and-resume (same steps, same data order, same weights as an uninterrupted run).
The single-process trainer is tested too (learning-rate schedule, loss going down)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _helpers import tiny_demo_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def moe_demo_target(demo_cache):
    from dspark.platform.demo.build import build_demo_target

    return build_demo_target(tiny_demo_config(moe=True, num_experts=4, experts_per_token=2, moe_intermediate_size=32),
                             demo_cache, progress=False, log=lambda m: None)


def make_data(target_info, out: Path) -> Path:
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target
    from dspark.platform.training.data import generate_data
    from dspark.platform.training.data_config import DataConfig

    if (out / "manifest.json").is_file():
        return out
    cfg = DataConfig(target=TargetConfig(path=str(target_info.path)),
                     sources=[{"kind": "corpus", "split": "train", "num_prompts": 16, "max_corpus_mb": 0.6}],
                     sampling={"max_new_tokens": 20}, output_dir=str(out), shard_size=8, min_loss_tokens=4)
    generate_data(cfg, load_target(cfg.target, target_info.path), target_info.path, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def dense_data(tiny_demo_target, tmp_path_factory):
    return make_data(tiny_demo_target, tmp_path_factory.mktemp("data-dense"))


@pytest.fixture(scope="module")
def moe_data(moe_demo_target, tmp_path_factory):
    return make_data(moe_demo_target, tmp_path_factory.mktemp("data-moe"))


def train_cfg(target_info, data_dir: Path, out: Path, name: str, **over):
    from dspark.platform.training.train_config import TrainConfig

    base = dict(
        name=name, output_dir=str(out), steps=4, log_every=1, tensorboard=False, seed=3,
        target={"path": str(target_info.path)},
        drafter={"kind": "dspark", "block_size": 3, "num_layers": 1, "markov_rank": 8},
        loss={"num_anchors": 6}, data={"path": str(data_dir)},
        batch={"global_batch_size": 4, "micro_batch_size": 1, "max_length": 48},
        distributed={"num_workers": 2}, checkpoint={"every_steps": 2},
    )
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return TrainConfig(**base)


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the last logged line of that step (a resumed run logs re-run steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dense_run(ray_cluster, tiny_demo_target, dense_data, tmp_path_factory):
    from dspark.platform.training.launch import run_training

    cfg = train_cfg(tiny_demo_target, dense_data, tmp_path_factory.mktemp("runs"), "dense")
    return cfg, run_training(cfg, log=lambda m: None)


def test_two_worker_zero2_run_trains_and_saves_a_loadable_drafter(dense_run, tiny_demo_target):
    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target

    cfg, res = dense_run
    assert res.steps == 4
    m = metrics(res.run_dir)
    assert sorted(m) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())
    assert 0 < m[4]["tau_probabilistic"] <= 1 + cfg.drafter.block_size
    # both workers' micro-batches entered every step: 4 sequences per step
    assert all(len(r["records"]) == 2 for r in m.values())  # rank 0's share (G = 2)
    target = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    drafter = load_drafter(res.drafter_dir, target)
    assert drafter.block_size == 3


def test_rerunning_a_finished_run_reuses_it(dense_run):
    from dspark.platform.training.launch import run_training

    cfg, res = dense_run
    lines = (res.run_dir / "metrics.jsonl").read_text()
    again = run_training(cfg, log=lambda m: None)
    assert again.steps == 4 and again.drafter_dir == res.drafter_dir and again.drafter_dir.is_dir()
    assert (res.run_dir / "metrics.jsonl").read_text() == lines  # nothing was trained again


def test_kill_and_resume_matches_an_uninterrupted_run(dense_run, tiny_demo_target, dense_data, tmp_path, monkeypatch):
    from dspark.drafter_service.checkpoint import load_drafter, trainable_state_dict
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target
    from dspark.platform.training.launch import FAIL_ENV, run_training

    ref_cfg, ref = dense_run
    cfg = train_cfg(tiny_demo_target, dense_data, tmp_path, "dense")  # same run, another directory
    marker = tmp_path / "failed-once"
    # rank 0's process is killed (SIGKILL) after step 3 of the 4-step epoch (16 records, 4 per step):
    # mid-epoch; the newest checkpoint is step 2, also mid-epoch
    monkeypatch.setenv(FAIL_ENV, f"3:{marker}:kill")
    res = run_training(cfg, max_failures=1, log=lambda m: None)
    assert marker.exists(), "the failure was not injected"
    assert res.steps == 4
    a, b = metrics(ref.run_dir), metrics(res.run_dir)
    assert [a[s]["records"] for s in range(1, 5)] == [b[s]["records"] for s in range(1, 5)]
    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # steps 1, 2, 3, then 3 and 4 again after the restart from step 2
    target = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    wa = trainable_state_dict(load_drafter(ref.drafter_dir, target))
    wb = trainable_state_dict(load_drafter(res.drafter_dir, target))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_moe_target_partitioned_with_zero3_gives_the_same_losses(ray_cluster, moe_demo_target, moe_data, tmp_path):
    from dspark.platform.training.launch import run_training

    runs = {}
    for sharding in ("none", "zero3"):
        cfg = train_cfg(moe_demo_target, moe_data, tmp_path, f"moe-{sharding}", steps=2,
                        distributed={"target_sharding": sharding}, checkpoint={"every_steps": 2})
        runs[sharding] = metrics(run_training(cfg, log=lambda m: None).run_dir)
    for step in (1, 2):
        assert runs["zero3"][step]["records"] == runs["none"][step]["records"]
        assert runs["zero3"][step]["loss"] == pytest.approx(runs["none"][step]["loss"], rel=1e-4)
    # each worker held about half of the target's parameters
    assert runs["zero3"][1]["target_local_params"] <= 0.6 * runs["none"][1]["target_local_params"]


def test_offline_feature_cache_gives_the_same_losses_as_online(dense_run, tiny_demo_target, dense_data, tmp_path):
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target
    from dspark.platform.training.feature_cache import write_feature_cache
    from dspark.platform.training.launch import run_training

    cache = tmp_path / "features"
    target = load_target(TargetConfig(path=str(tiny_demo_target.path)))
    write_feature_cache(dense_data, target, cache, dtype="float32", progress=False, log=lambda m: None)
    cfg = train_cfg(tiny_demo_target, dense_data, tmp_path, "offline", steps=2,
                    data={"features": "offline", "feature_cache": str(cache)}, checkpoint={"every_steps": 2})
    got = metrics(run_training(cfg, log=lambda m: None).run_dir)
    ref = metrics(dense_run[1].run_dir)
    for step in (1, 2):
        assert got[step]["records"] == ref[step]["records"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4)
