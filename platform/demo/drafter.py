"""The demo's drafter: trained by a recipe (a ``dspark train`` YAML) against the demo's target,
or reused from an earlier run of the same recipe.

Contract: a drafter is reused only when it was trained with the same *content key*, a hash of
everything that decides its weights: the recipe's training fields (drafter shape, loss, optimiser,
batch, steps, seed, worker count), the data's generation settings (``data.generation_key``) and
the target's identity (the demo target's cache directory name, itself a hash of its recipe; or,
for a checkpoint directory, its path and the names, sizes and modification times of its files).
Run name, output paths, logging and checkpoint cadence are not part of the key.

Lookup order: ``$DSPARK_CACHE/drafters/<name>-<key>/`` (complete when it holds ``demo_drafter.json``),
then the recipe's own run directory (``<output_dir>/<name>/``, e.g. what ``dspark train
clusters/train-demo.yaml`` wrote) when its ``train_config.json`` and data manifest give the same
key (it is then copied into the cache, so another checkout reuses it too), else data generation
and training into the cache entry. Training there resumes from its newest checkpoint when
interrupted. Recipes with JSONL prompt sources are never matched against run directories (the
key does not see a file's content changing), only against the cache entries the demo made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dspark.platform.config import DemoConfig, load_config

__all__ = ["DrafterInfo", "Recipe", "load_recipe", "target_key", "find_drafter", "ensure_drafter", "estimate_seconds",
           "data_ready"]

#: bump when the training code changes in a way the recipe does not capture
CACHE_FORMAT = "1"
MARKER = "demo_drafter.json"

# Rates of the demo recipe measured on a 2-core x86 laptop-class CPU (clusters/train-demo.yaml on
# the demo target): answers generated per second by the engine, and seconds per training sequence
# with 2 workers; plus the fixed start-up cost of a Ray Train run.
_ANSWER_TOKENS_PER_S = 550.0
_TRAIN_S_PER_SEQUENCE = 0.14
_TRAIN_STARTUP_S = 45.0


@dataclass(frozen=True)
class Recipe:
    train: Any  # TrainConfig, its target the demo's
    data: Any  # DataConfig (target the demo's) or None when data.path already holds the data
    key: str
    path: str


@dataclass(frozen=True)
class DrafterInfo:
    path: Path
    source: str  # "given" | "cache" | "run" (the recipe's run directory) | "trained"
    key: str | None
    seconds: float  # of this call (training included when it trained)
    record: dict  # the cache marker (recipe, timings, final metrics), {} when none


def target_key(target_path: str, demo_target: Any) -> str:
    """Identity of a target without loading it (see the module docstring)."""
    from dspark.platform.demo.build import demo_target_dir

    if target_path == "demo":
        return demo_target_dir(demo_target).name
    p = Path(target_path).expanduser().resolve()
    files = sorted(f for f in p.glob("*") if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.startswith("tokenizer")))
    return "path:" + str(p) + ":" + hashlib.sha256(
        "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode()).hexdigest()[:16]


def _key(train: dict, generation: dict, tkey: str) -> str:
    t = json.loads(json.dumps(train))
    for k in ("name", "output_dir", "log_every", "tensorboard", "checkpoint", "demo_target"):
        t.pop(k, None)
    t["target"] = {k: v for k, v in t["target"].items() if k not in ("path", "device")}
    t["data"] = {k: v for k, v in t["data"].items() if k not in ("path", "generate_config")}
    t["distributed"] = {k: v for k, v in t["distributed"].items() if k != "address"}
    payload = json.dumps({"train": t, "data": generation, "target": tkey, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _generation(dcfg: Any) -> dict:
    from dspark.platform.training.data import generation_key
    from dspark.platform.training.data_io import sha256_file

    g = generation_key(dcfg)
    files = [s.path for s in dcfg.sources if s.kind == "jsonl"]
    if files:  # the content of a prompt file decides the data too
        g = {**g, "jsonl_sha256": [sha256_file(Path(f)) if Path(f).is_file() else None for f in files]}
    return g


def _data_manifest(path: Path) -> dict | None:
    f = path / "manifest.json"
    if not f.is_file():
        return None
    m = json.loads(f.read_text())
    return m if m.get("complete") else None


def load_recipe(cfg: DemoConfig) -> Recipe:
    """The recipe with the demo's target in place of its own, and its content key."""
    from dspark.platform.config import ConfigError
    from dspark.platform.training.data_config import DataConfig
    from dspark.platform.training.train_config import TrainConfig

    tgt = [f"target={json.dumps(cfg.target.model_dump(mode='json'))}",
           f"demo_target={json.dumps(cfg.demo_target.model_dump(mode='json'))}"]
    train = load_config(TrainConfig, cfg.train.recipe, tgt)
    tkey = target_key(cfg.target.path, cfg.demo_target)
    if train.data.generate_config is not None:
        data = load_config(DataConfig, train.data.generate_config, (*tgt, f"output_dir={train.data.path}"))
        generation = _generation(data)
    else:  # the data must exist already; its manifest says how it was made
        data = None
        m = _data_manifest(Path(train.data.path).expanduser())
        if m is None:
            raise ConfigError(f"{cfg.train.recipe}: data.path {train.data.path} holds no complete data set and "
                              "data.generate_config is not set")
        generation = m["generation"]
    return Recipe(train, data, _key(train.model_dump(mode="json"), generation, tkey), cfg.train.recipe)


def _cache_dir(recipe: Recipe) -> Path:
    from dspark.platform.demo.build import cache_root

    return cache_root() / "drafters" / f"{recipe.train.name}-{recipe.key}"


def _run_dir_key(run: Path) -> str | None:
    """The content key of an earlier ``dspark train`` run directory, or None when it has no
    finished drafter or its data cannot be identified."""
    from dspark.platform.training.train_config import TrainConfig

    cfg_file, drafter = run / "train_config.json", run / "drafter" / "drafter_config.json"
    if not (cfg_file.is_file() and drafter.is_file()):
        return None
    try:
        old = TrainConfig.model_validate(json.loads(cfg_file.read_text()))
    except Exception:  # written by another version of the schema: not ours to reuse
        return None
    m = _data_manifest(Path(old.data.path).expanduser())
    if m is None or any(s.get("kind") == "jsonl" for s in m["generation"].get("sources", [])):
        return None
    return _key(old.model_dump(mode="json"), m["generation"], target_key(old.target.path, old.demo_target))


def find_drafter(cfg: DemoConfig, recipe: Recipe | None = None, *, adopt: bool = True) -> DrafterInfo | None:
    """A drafter trained with the recipe's key, without training (None when there is none)."""
    recipe = recipe or load_recipe(cfg)
    cache = _cache_dir(recipe)
    if (cache / MARKER).is_file() and (cache / "drafter" / "drafter_config.json").is_file():
        return DrafterInfo(cache / "drafter", "cache", recipe.key, 0.0, json.loads((cache / MARKER).read_text()))
    run = Path(recipe.train.output_dir).expanduser() / recipe.train.name
    jsonl = recipe.data is not None and any(s.kind == "jsonl" for s in recipe.data.sources)
    if jsonl or _run_dir_key(run) != recipe.key:
        return None
    record = {"key": recipe.key, "recipe": recipe.path, "adopted_from": str(run.resolve()),
              "train_config": recipe.train.model_dump(mode="json"), "metrics": _last_metrics(run)}
    if not adopt:
        return DrafterInfo(run / "drafter", "run", recipe.key, 0.0, record)
    _write_entry(cache, run / "drafter", record)
    return DrafterInfo(cache / "drafter", "run", recipe.key, 0.0, record)


def _write_entry(cache: Path, drafter: Path, record: dict) -> None:
    """Copy a finished drafter into the cache entry and write its marker (last, atomically)."""
    cache.mkdir(parents=True, exist_ok=True)
    if drafter.resolve() != (cache / "drafter").resolve():
        tmp = cache / ".drafter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(drafter, tmp)
        shutil.rmtree(cache / "drafter", ignore_errors=True)
        tmp.rename(cache / "drafter")
    (cache / f"{MARKER}.tmp").write_text(json.dumps(record, indent=2))
    (cache / f"{MARKER}.tmp").replace(cache / MARKER)


def _last_metrics(run: Path) -> dict:
    f = run / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def estimate_seconds(recipe: Recipe, data_ready: bool) -> tuple[float, float]:
    """(data generation, training) seconds expected on a 2-core CPU for the demo target."""
    data_s = 0.0
    if not data_ready and recipe.data is not None:
        prompts = sum(getattr(s, "num_prompts", None) or getattr(s, "limit", None) or 256 for s in recipe.data.sources)
        data_s = prompts * recipe.data.sampling.max_new_tokens / _ANSWER_TOKENS_PER_S
    t = recipe.train
    return data_s, _TRAIN_STARTUP_S + t.steps * t.batch.global_batch_size * _TRAIN_S_PER_SEQUENCE


def data_ready(recipe: Recipe, target_path: Path) -> bool:
    """Whether the recipe's data set exists already (no generation needed)."""
    return _data_manifest(_data_dir(recipe, target_path)) is not None


def _data_dir(recipe: Recipe, target_path: Path) -> Path:
    """The recipe's data directory when it holds this data set already, else a cache directory
    keyed by the generation settings and the target."""
    from dspark.platform.demo.build import cache_root

    own = Path(recipe.train.data.path).expanduser()
    m = _data_manifest(own)
    if recipe.data is None or (m is not None and m["generation"] == _generation(recipe.data)
                               and Path(m["target"]["path"]).resolve() == target_path.resolve()):
        return own
    gkey = hashlib.sha256(json.dumps([_generation(recipe.data), str(target_path.resolve())],
                                     sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "data" / f"{recipe.train.name}-{gkey}"


def ensure_drafter(cfg: DemoConfig, target_path: Path, *, log: Callable[[str], None] = print,
                   progress: bool = True) -> DrafterInfo:
    """The demo's drafter directory: given, found (see :func:`find_drafter`) or trained now."""
    t0 = time.perf_counter()
    if cfg.train.drafter_path is not None:
        p = Path(cfg.train.drafter_path).expanduser()
        if not (p / "drafter_config.json").is_file():
            from dspark.drafter_service.checkpoint import DrafterLoadError

            raise DrafterLoadError(f"train.drafter_path {p} is not a drafter checkpoint directory (no drafter_config.json)")
        return DrafterInfo(p, "given", None, 0.0, {})
    recipe = load_recipe(cfg)
    found = find_drafter(cfg, recipe)
    if found is not None:
        return found
    data_dir = _data_dir(recipe, target_path)
    have_data = _data_manifest(data_dir) is not None
    est_data, est_train = estimate_seconds(recipe, have_data)
    t = recipe.train
    log(f"no drafter trained with recipe {recipe.path} (key {recipe.key}) yet: "
        + ("" if have_data else f"generating data into {data_dir} (~{est_data / 60:.0f} min), then ")
        + f"training {t.drafter.kind} for {t.steps} steps on {t.distributed.num_workers} worker(s) "
        f"(~{est_train / 60:.0f} min on a 2-core CPU) into {_cache_dir(recipe)}")
    t_data = time.perf_counter()
    if not have_data:
        from dspark.platform.target.loading import load_target
        from dspark.platform.training.data import generate_data

        dcfg = recipe.data.model_copy(update={"output_dir": str(data_dir)})
        generate_data(dcfg, load_target(dcfg.target, target_path), target_path, progress=progress, log=log)
    data_s = time.perf_counter() - t_data
    cache = _cache_dir(recipe)
    train = recipe.train.model_copy(update={
        "name": cache.name, "output_dir": str(cache.parent),
        "target": recipe.train.target.model_copy(update={"path": str(target_path.resolve())}),
        "data": recipe.train.data.model_copy(update={"path": str(data_dir.resolve()), "generate_config": None}),
    })
    t_train = time.perf_counter()
    res = _train_with_progress(train, cache, log=log, progress=progress)
    record = {"key": recipe.key, "recipe": recipe.path, "train_config": recipe.train.model_dump(mode="json"),
              "data_dir": str(data_dir.resolve()), "steps": res.steps, "metrics": res.metrics,
              "seconds": {"data": round(data_s, 1), "train": round(time.perf_counter() - t_train, 1)}}
    _write_entry(cache, res.drafter_dir, record)
    return DrafterInfo(cache / "drafter", "trained", recipe.key, time.perf_counter() - t0, record)


def _train_with_progress(train: Any, run_dir: Path, *, log: Callable[[str], None], progress: bool):
    """``run_training`` with a progress bar fed by the run's metrics.jsonl (rank 0 writes a line
    every ``log_every`` steps; Ray Train's own output is not shown)."""
    from tqdm.auto import tqdm

    from dspark.platform.training.launch import run_training

    done = threading.Event()
    metrics = run_dir / "metrics.jsonl"

    def watch(bar) -> None:
        while not done.wait(1.0):
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            if lines:
                m = json.loads(lines[-1])
                bar.n = min(int(m.get("step", 0)), bar.total)
                bar.set_postfix(loss=f"{m.get('loss', float('nan')):.3f}", tau=f"{m.get('tau_probabilistic', 0):.2f}")
                bar.refresh()

    with tqdm(total=train.steps, desc="train drafter", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        watcher = threading.Thread(target=watch, args=(bar,), daemon=True)
        watcher.start()
        try:
            res = run_training(train, log=log)
        finally:
            done.set()
            watcher.join()
        bar.n = res.steps
        bar.refresh()
    return res
