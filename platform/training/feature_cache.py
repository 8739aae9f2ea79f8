"""Offline target-feature cache (optional; training computes target features online by default).

For every record of a data set, in TrainData order, the frozen target's forward over the whole
record gives its fused features (the concatenated outputs of ``layer_ids``) and its last hidden
state (final-norm output, what the LM head reads). They are stored as sharded safetensors::

    features-00000.safetensors
        features     [T, n_layers * hidden]  cache dtype; T = tokens of the shard's records
        last_hidden  [T, hidden]             cache dtype
        offsets      [n + 1] int64           record j's rows are offsets[j]:offsets[j+1]
        index        [n] int64               the records' positions in TrainData

A shard holds consecutive records and grows while its payload stays within ``shard_bytes``
(a record larger than that gets a shard of its own), so the plan, the size estimate and every
shard's bytes are functions of the data set and the settings alone: an interrupted run resumes
by skipping the shards its manifest lists and writes byte-identical ones.

Size: tokens * (n_layers + 1) * hidden * itemsize, plus 16 bytes per record and 8 per shard.
DeepSpec's Qwen3-4B cache is ~38 TB; :func:`estimate_feature_cache_bytes` says so before
anything is written.
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

from dspark.platform.training.data_io import (
    MANIFEST,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    describe_differences,
    read_manifest,
    remove_stale,
    same_target,
    sha256_file,
    target_identity,
    writer_lock,
)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_DTYPES",
    "FeatureCache",
    "data_fingerprint",
    "estimate_feature_cache_bytes",
    "format_bytes",
    "plan_shards",
    "write_feature_cache",
]

CACHE_FORMAT = "dspark-features/1"
CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # name -> bytes per element
_SHARD_GLOB = "features-*.safetensors"


def _shard_name(k: int) -> str:
    return f"features-{k:05d}.safetensors"


def _payload(tokens: int, records: int, row_bytes: int) -> int:
    """Tensor bytes of one shard: features + last_hidden rows, offsets [n+1], index [n]."""
    return tokens * row_bytes + 8 * (records + 1) + 8 * records


def plan_shards(lengths: Sequence[int], row_bytes: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Consecutive record ranges ``[(start, end), ...]``, each within ``shard_bytes`` of payload
    unless it is a single record.

    >>> plan_shards([4, 4, 4], row_bytes=10, shard_bytes=100)  # 4 tokens + 1 record = 64 bytes
    [(0, 1), (1, 2), (2, 3)]
    """
    if shard_bytes < 1 or row_bytes < 1:
        raise ValueError("shard_bytes and row_bytes must be positive")
    plan, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and _payload(tokens + int(n), i + 1 - start, row_bytes) > shard_bytes:
            plan.append((start, i))
            start, tokens = i, 0
        tokens += int(n)
    if len(lengths) > start:
        plan.append((start, len(lengths)))
    return plan


def estimate_feature_cache_bytes(lengths: Sequence[int], feature_dim: int, hidden_size: int,
                                 dtype: str = "bfloat16", shard_bytes: int = 1 << 30) -> int:
    """Bytes of tensor data the cache will hold (the files add a JSON header of a few hundred
    bytes each)."""
    if dtype not in CACHE_DTYPES:
        raise DataError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)} (got {dtype!r})")
    row = (feature_dim + hidden_size) * CACHE_DTYPES[dtype]
    return sum(_payload(sum(int(n) for n in lengths[a:b]), b - a, row)
               for a, b in plan_shards(lengths, row, shard_bytes))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def data_fingerprint(data_manifest: dict) -> str:
    """Identity of a data set's content: the hashes of its shards, in order."""
    h = hashlib.sha256("\n".join(s["sha256"] for s in data_manifest["shards"]).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- write
def _forward_records(target: Any, data: Any, start: int, end: int, batch_size: int, dtype) -> tuple:
    """Target features of records ``start..end-1`` -> (features [T, F], last_hidden [T, H],
    offsets [n+1]), rows in record order, computed in right-padded micro-batches."""
    import torch

    feats, hidden = [], []
    for a in range(start, end, batch_size):
        idx = list(range(a, min(a + batch_size, end)))
        batch = data.collate(idx)
        out = target(batch.input_ids.to(target.device), attention_mask=batch.attention_mask.to(target.device),
                     logits_positions=None, with_features=True)
        lens = batch.attention_mask.sum(1).tolist()
        for row, n in enumerate(lens):
            feats.append(out.features[row, :n].to(dtype).cpu())  # [n, F]
            hidden.append(out.last_hidden[row, :n].to(dtype).cpu())  # [n, H]
    lengths = torch.tensor([0] + [f.shape[0] for f in feats], dtype=torch.int64)
    return torch.cat(feats), torch.cat(hidden), torch.cumsum(lengths, 0)


def write_feature_cache(
    data_dir: str | Path,
    target: Any,
    out_dir: str | Path,
    shard_bytes: int = 1 << 30,
    *,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    target_path: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Write (or resume) the feature cache of the data set in ``data_dir``; returns its manifest.

    ``target`` is a loaded ``FrozenTarget``; it must be the target that generated the data
    (compared by identity; ``force`` skips the check and discards an existing cache made with
    other settings). ``target_path`` defaults to the directory the model was loaded from.
    """
    import torch
    from safetensors.torch import save as st_save
    from tqdm.auto import tqdm

    from dspark.platform.training.dataset import TrainData

    if dtype not in CACHE_DTYPES:
        raise DataError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)} (got {dtype!r})")
    if batch_size < 1 or shard_bytes < 1:
        raise DataError("batch_size and shard_bytes must be positive")
    data = TrainData(data_dir)
    out = Path(out_dir)
    if out.resolve() == data.path.resolve():
        raise DataError("write the feature cache to its own directory, not into the data directory")
    ident = target_identity(target, Path(target_path if target_path is not None else target.model.name_or_path))
    diff = same_target(data.manifest["target"], ident)
    if diff and not force:
        raise DataError(f"the target ({ident['path']}) is not the one that generated {data.path} "
                        f"({data.manifest['target']['path']}; differs in {', '.join(diff)}); --force to cache anyway")
    row = (target.feature_dim + target.hidden_size) * CACHE_DTYPES[dtype]
    plan = plan_shards(data.lengths, row, shard_bytes)
    estimate = estimate_feature_cache_bytes(data.lengths, target.feature_dim, target.hidden_size, dtype, shard_bytes)
    log(f"feature cache: {len(data)} records, {data.num_tokens:,} tokens x ({target.feature_dim} + "
        f"{target.hidden_size}) x {CACHE_DTYPES[dtype]} bytes = {format_bytes(estimate)} in {len(plan)} shard(s)")
    key = {
        "data": data_fingerprint(data.manifest),
        "layer_ids": list(target.layer_ids),
        "dtype": dtype,
        "target_dtype": str(target.dtype).removeprefix("torch."),
        "shard_bytes": shard_bytes,
        "batch_size": batch_size,  # padding in micro-batches moves the last bits of the features
    }
    manifest = {
        "format": CACHE_FORMAT,
        "complete": False,
        "key": key,
        "data": {"path": str(data.path.resolve()), "records": len(data), "tokens": data.num_tokens},
        "target": ident,
        "feature_dim": target.feature_dim,
        "hidden_size": target.hidden_size,
        "estimate_bytes": estimate,
        "shards": [],
    }
    with writer_lock(out):
        done: list[dict] = []
        if (out / MANIFEST).is_file():
            old = read_manifest(out, CACHE_FORMAT)
            problems = describe_differences(old["key"], key)
            problems += [f"target differs in {f}" for f in same_target(old["target"], ident)]
            if problems and not force:
                raise DataError(f"{out} holds a feature cache made with different settings ({'; '.join(problems)}); "
                                f"use another directory, or --force to discard it")
            if not problems:
                for s in old["shards"]:
                    if not (out / s["file"]).is_file() or sha256_file(out / s["file"]) != s["sha256"]:
                        log(f"{s['file']} is missing or altered; recomputing from there")
                        break
                    done.append(s)
        remove_stale(out, _SHARD_GLOB, {s["file"] for s in done})
        manifest["shards"] = done
        atomic_write_json(out / MANIFEST, manifest)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        bar = tqdm(total=len(data), initial=done[-1]["end"] if done else 0, desc="features", unit="record",
                   disable=not progress, dynamic_ncols=True)
        try:
            for k in range(len(done), len(plan)):
                a, b = plan[k]
                feats, hidden, offsets = _forward_records(target, data, a, b, batch_size, torch_dtype)
                blob = st_save({"features": feats.contiguous(), "last_hidden": hidden.contiguous(), "offsets": offsets,
                                "index": torch.arange(a, b, dtype=torch.int64)})
                name = _shard_name(k)
                atomic_write_bytes(out / name, blob)
                manifest["shards"].append({"file": name, "start": a, "end": b, "tokens": int(offsets[-1]),
                                           "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
                atomic_write_json(out / MANIFEST, manifest)
                bar.update(b - a)
        finally:
            bar.close()
        manifest["complete"] = True
        atomic_write_json(out / MANIFEST, manifest)
        return manifest


# ---------------------------------------------------------------------------------------- read
class FeatureCache:
    """Read side: the cached features of record ``i`` (TrainData position) without loading the
    shard (safetensors slices are read from a memory map)."""

    def __init__(self, path: str | Path, data: Any = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, CACHE_FORMAT)
        if not self.manifest.get("complete"):
            raise DataError(f"{self.path} is incomplete; rerun `dspark data cache-features` to finish it")
        if data is not None and data_fingerprint(data.manifest) != self.manifest["key"]["data"]:
            raise DataError(f"{self.path} caches another data set than {data.path}")
        self.feature_dim = int(self.manifest["feature_dim"])
        self.hidden_size = int(self.manifest["hidden_size"])
        self._starts = [s["start"] for s in self.manifest["shards"]]
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}
        for s in self.manifest["shards"]:
            if not (self.path / s["file"]).is_file():
                raise DataError(f"{self.path / s['file']} is listed in the manifest but missing")

    def __len__(self) -> int:
        return self.manifest["data"]["records"]

    def _shard(self, k: int):
        if k not in self._handles:
            from safetensors import safe_open

            self._handles[k] = safe_open(str(self.path / self.manifest["shards"][k]["file"]), framework="pt")
            self._offsets[k] = self._handles[k].get_tensor("offsets").tolist()
        return self._handles[k], self._offsets[k]

    def get(self, i: int) -> tuple:
        """(features [T, F], last_hidden [T, H]) of record ``i``, in the cache dtype."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        f, off = self._shard(k)
        j = i - self._starts[k]
        a, b = off[j], off[j + 1]
        return f.get_slice("features")[a:b], f.get_slice("last_hidden")[a:b]

    def batch(self, indices: Sequence[int], seq_len: int) -> tuple:
        """Zero-padded (features [B, S, F], last_hidden [B, S, H]) of the records ``indices``,
        cut to ``seq_len`` tokens: the companion of ``TrainData.collate(indices)``."""
        import torch

        rows = [self.get(int(i)) for i in indices]
        dtype = rows[0][0].dtype
        feats = torch.zeros((len(rows), seq_len, self.feature_dim), dtype=dtype)  # [B, S, F]
        hidden = torch.zeros((len(rows), seq_len, self.hidden_size), dtype=dtype)  # [B, S, H]
        for r, (f, h) in enumerate(rows):
            n = min(seq_len, f.shape[0])
            feats[r, :n], hidden[r, :n] = f[:n], h[:n]
        return feats, hidden
