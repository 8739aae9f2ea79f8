"""Storage plumbing shared by the record shards and the feature cache: atomic writes, manifests,
a per-directory writer lock, content hashes, and the identity of a target checkpoint.

Contract of a dataset directory (records or features): shard files are written to a temporary
name and renamed into place, then ``manifest.json`` is rewritten (also atomically) to list them.
A shard file is trusted only if the manifest lists it with the same SHA-256; anything else in
the directory that looks like ours is stale and is removed before writing resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "DataError",
    "MANIFEST",
    "atomic_write_bytes",
    "atomic_write_json",
    "tmp_name",
    "remove_stale",
    "read_manifest",
    "sha256_file",
    "writer_lock",
    "target_identity",
    "same_target",
    "describe_differences",
]

MANIFEST = "manifest.json"
_TMP_MARK = ".tmp-"


class DataError(ValueError):
    """A data directory cannot be written or read as asked (message is for users)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def tmp_name(path: Path) -> Path:
    """Where a shard is written before it is renamed to ``path``."""
    return path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")


def remove_stale(directory: Path, pattern: str, keep: set[str]) -> list[str]:
    """Delete files matching ``pattern`` that are not in ``keep`` (unlisted shards of an
    interrupted run, temporary files); returns their names."""
    gone = []
    for p in sorted(directory.glob(pattern)):
        if p.is_file() and p.name not in keep:
            p.unlink()
            gone.append(p.name)
    for p in sorted(directory.glob(f"*{_TMP_MARK}*")):
        if p.is_file():
            p.unlink()
            gone.append(p.name)
    return gone


def read_manifest(directory: Path, expect_format: str) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}: not a dataset directory (or never written)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    fmt = m.get("format") if isinstance(m, dict) else None
    if fmt != expect_format:
        raise DataError(f"{path}: format {fmt!r}, expected {expect_format!r}")
    return m


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """One writer per directory: a second concurrent writer is refused, not serialised."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output directory {directory}: {exc.strerror or exc}") from None
    with open(directory / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another process is writing {directory}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ target identity
def _canonical_json_hash(path: Path, drop: tuple[str, ...] = ()) -> str | None:
    if not path.is_file():
        return None
    obj = json.loads(path.read_text())
    if isinstance(obj, dict):
        for k in drop:
            obj.pop(k, None)
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _weights_fingerprint(ckpt: Path, sample: int = 1 << 20) -> str:
    """Names, sizes and the first and last MiB of every ``*.safetensors`` file: cheap on a
    multi-hundred-GB checkpoint and catches re-saves, but it is a fingerprint, not a checksum."""
    h = hashlib.sha256()
    for p in sorted(ckpt.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}:".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(size - sample)
                h.update(fh.read(sample))
    return h.hexdigest()[:16]


def _tokenizer_fingerprint(ckpt: Path) -> str | None:
    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        p = ckpt / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16] if found else None


def target_identity(target: Any, ckpt: Path) -> dict:
    """What identifies the target that produced (or is to read) a data set. ``path`` is recorded
    for people; :func:`same_target` compares the content fields only, so a moved checkpoint still
    matches."""
    ckpt = Path(ckpt).resolve()
    return {
        "path": str(ckpt),
        "architecture": type(target.model).__name__,
        "model_type": str(getattr(target.config, "model_type", "")),
        "vocab_size": int(target.vocab_size),
        "config_hash": _canonical_json_hash(ckpt / "config.json", drop=("transformers_version", "_name_or_path")),
        "weights_hash": _weights_fingerprint(ckpt),
        "tokenizer_hash": _tokenizer_fingerprint(ckpt),
    }


_CONTENT_KEYS = ("architecture", "model_type", "vocab_size", "config_hash", "weights_hash", "tokenizer_hash")


def same_target(a: dict, b: dict) -> list[str]:
    """The identity fields on which two targets differ (empty = same target)."""
    return [k for k in _CONTENT_KEYS if a.get(k) != b.get(k)]


def describe_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["sampling.temperature: 0.7 -> 0.9", ...]`` for two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out.extend(describe_differences(old.get(k), new.get(k), f"{prefix}{k}."))
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []
