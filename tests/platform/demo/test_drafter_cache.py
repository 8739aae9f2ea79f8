"""The demo's drafter cache without training: the content key sees what decides the weights and
nothing else, a finished `dspark train` run of the same recipe is adopted into the cache, and a
run of another recipe is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _helpers import tiny_demo_config


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = {"sources": [{"kind": "corpus", "num_prompts": 8}], "sampling": {"max_new_tokens": 16},
            "min_loss_tokens": 4, "output_dir": "unused"}
    train = {"name": "tiny", "output_dir": "runs", "steps": 3, "data": {"path": "data", "generate_config": "data.yaml"},
             "batch": {"global_batch_size": 2, "micro_batch_size": 1}, "distributed": {"num_workers": 1}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    return tmp_path


def demo_cfg(**train_over):
    from dspark.platform.config import DemoConfig

    return DemoConfig(demo_target=tiny_demo_config(), train={"recipe": "train.yaml", **train_over})


def key_with(recipe_dir: Path, **over) -> str:
    from dspark.platform.demo.drafter import load_recipe

    train = yaml.safe_load((recipe_dir / "train.yaml").read_text())
    train.update(over)
    (recipe_dir / "other.yaml").write_text(yaml.safe_dump(train))
    return load_recipe(demo_cfg(recipe="other.yaml")).key


def test_key_covers_the_weights_and_nothing_else(recipe_dir):
    from dspark.platform.config import DemoConfig
    from dspark.platform.demo.drafter import load_recipe

    base = load_recipe(demo_cfg()).key
    assert base == load_recipe(demo_cfg()).key
    # bookkeeping does not change the drafter
    assert key_with(recipe_dir, name="renamed", output_dir="elsewhere", log_every=1, checkpoint={"every_steps": 1}) == base
    # what it learns from, and how long, does
    assert key_with(recipe_dir, steps=4) != base
    assert key_with(recipe_dir, seed=1) != base
    assert key_with(recipe_dir, drafter={"block_size": 3}) != base
    other_target = DemoConfig(demo_target=tiny_demo_config(seed=1), train={"recipe": "train.yaml"})
    assert load_recipe(other_target).key != base
    data = yaml.safe_load((recipe_dir / "data.yaml").read_text())
    (recipe_dir / "data.yaml").write_text(yaml.safe_dump({**data, "sampling": {"max_new_tokens": 17}}))
    assert load_recipe(demo_cfg()).key != base


def fake_run(recipe_dir: Path, recipe) -> Path:
    """What `dspark train` leaves behind: train_config.json, the final drafter, the data manifest."""
    from dspark.platform.training.data import generation_key

    run = recipe_dir / "runs" / "tiny"
    (run / "drafter").mkdir(parents=True)
    (run / "drafter" / "drafter_config.json").write_text("{}")
    (run / "train_config.json").write_text(json.dumps(recipe.train.model_dump(mode="json")))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "tau_probabilistic": 1.5}) + "\n")
    (recipe_dir / "data").mkdir()
    (recipe_dir / "data" / "manifest.json").write_text(json.dumps(
        {"complete": True, "generation": generation_key(recipe.data), "target": {"path": "/nowhere"}}))
    return run


def test_a_finished_run_of_the_recipe_is_adopted_into_the_cache(recipe_dir):
    from dspark.platform.demo.drafter import data_ready, estimate_seconds, find_drafter, load_recipe

    recipe = load_recipe(demo_cfg())
    assert find_drafter(demo_cfg(), recipe) is None
    data_s, train_s = estimate_seconds(recipe, data_ready=False)
    assert data_s > 0 and train_s > 0
    fake_run(recipe_dir, recipe)
    found = find_drafter(demo_cfg(), recipe)
    assert found.source == "run" and found.key == recipe.key
    assert found.path == recipe_dir / "cache" / "drafters" / f"tiny-{recipe.key}" / "drafter"
    assert (found.path / "drafter_config.json").is_file() and found.record["metrics"]["step"] == 3
    again = find_drafter(demo_cfg(), recipe)
    assert again.source == "cache" and again.path == found.path


def test_a_run_of_another_recipe_is_not_adopted(recipe_dir):
    from dspark.platform.demo.drafter import find_drafter, load_recipe

    recipe = load_recipe(demo_cfg())
    run = fake_run(recipe_dir, recipe)
    cfg = json.loads((run / "train_config.json").read_text())
    cfg["steps"] = 99  # trained longer than the recipe says
    (run / "train_config.json").write_text(json.dumps(cfg))
    assert find_drafter(demo_cfg(), recipe) is None


def test_a_given_drafter_directory_is_checked(recipe_dir):
    from dspark.drafter_service.checkpoint import DrafterLoadError
    from dspark.platform.demo.drafter import ensure_drafter

    with pytest.raises(DrafterLoadError, match="not a drafter checkpoint"):
        ensure_drafter(demo_cfg(drafter_path=str(recipe_dir)), recipe_dir)
