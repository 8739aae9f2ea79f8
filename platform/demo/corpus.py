"""The demo corpus: the running Python's standard-library ``.py`` files.

Each file is assigned to ``train`` / ``validation`` / ``test`` by a hash of its path relative
to the standard-library root, so the split is the same on every machine with the same Python,
whatever order the file system lists files in. The test split is for held-out evaluation only:
nothing in the project trains on it (the tokenizer included).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

__all__ = ["Split", "SPLITS", "SourceFile", "stdlib_root", "split_of", "iter_sources", "read_split"]


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # path relative to the stdlib root, '/'-separated
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> Split:
    """Deterministic split of one file: the first 8 bytes of sha256(relpath) as a fraction."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def iter_sources(root: Path | None = None, max_bytes: int | None = None) -> Iterator[SourceFile]:
    """All UTF-8 ``.py`` files under ``root`` (the stdlib by default), in sorted path order,
    skipping ``site-packages`` (installed third-party code is not the standard library) and
    files that do not decode as UTF-8 (a few encoding test fixtures). Stops once ``max_bytes``
    of text has been yielded."""
    root = Path(root) if root is not None else stdlib_root()
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    total = 0
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        try:
            text = p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield SourceFile(p.relative_to(root).as_posix(), text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def read_split(
    split: Split,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    max_bytes: int | None = None,
    root: Path | None = None,
) -> list[SourceFile]:
    """The files of one split (``max_bytes`` caps the corpus read *before* splitting, so the
    three splits of one configuration never overlap)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [f for f in iter_sources(root, max_bytes) if split_of(f.relpath, fractions) == split]
