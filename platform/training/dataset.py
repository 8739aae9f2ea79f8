"""Reading a generated data set for training: :class:`TrainData`.

Batching contract (what makes data order resumable and rank-safe):

* Epoch ``e`` visits the records in ``permutation(N)`` drawn from a generator seeded with
  ``(seed, e)``: the same on every rank and every run.
* The permutation is cut into global batches of ``batch_size * world_size`` records; the
  remainder (fewer than one global batch) is dropped, so every rank gets the same number of full
  batches. Rank ``r`` takes slice ``[r * batch_size, (r + 1) * batch_size)`` of each global
  batch: the ranks' records are disjoint and their union is the epoch's kept records.
* ``start_step`` skips that many batches by index arithmetic, so a resumed job sees exactly the
  batches an uninterrupted one would have seen from there.

Records are held in memory as one flat int32 token buffer plus offsets (about 5 bytes per
token with the mask), read once from the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from dspark.platform.training.data import DATA_FORMAT
from dspark.platform.training.data_io import DataError, read_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "Record", "TrainData"]


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    prompt_len: int
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] int8


@dataclass(frozen=True)
class Batch:
    """Right-padded records. All tensors are int64 ``[B, S]``, S = longest record in the batch
    (capped at the data set's max_length); ``index`` holds the records' positions in TrainData."""

    input_ids: torch.Tensor  # [B, S] pad_token_id where attention_mask is 0
    loss_mask: torch.Tensor  # [B, S] 1 on answer tokens, 0 on prompt and padding
    attention_mask: torch.Tensor  # [B, S] 1 on real tokens
    index: torch.Tensor  # [B]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.loss_mask, self.attention_mask, self.index)))


class TrainData:
    """The records of a data directory written by ``generate_data``, in shard order."""

    def __init__(self, path: str | Path, *, max_length: int | None = None, allow_incomplete: bool = False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.manifest = read_manifest(self.path, DATA_FORMAT)
        if not self.manifest.get("complete") and not allow_incomplete:
            done, total = self.manifest["counts"].get("prompts_done", 0), self.manifest["prompts"]["total"]
            raise DataError(f"{self.path} is incomplete ({done} of {total} prompts); "
                            f"rerun `dspark data generate` to finish it")
        if max_length is not None and max_length < 2:
            raise DataError(f"max_length must be >= 2 (got {max_length})")
        self.max_length = min(max_length or self.manifest["max_length"], self.manifest["max_length"])
        self.pad_token_id = int(self.manifest["pad_token_id"])
        tables = []
        for s in self.manifest["shards"]:
            p = self.path / s["file"]
            if not p.is_file():
                raise DataError(f"{p} is listed in the manifest but missing")
            t = pq.read_table(p, columns=["id", "source", "prompt_len", "input_ids", "loss_mask"])
            if t.num_rows != s["records"]:
                raise DataError(f"{p} holds {t.num_rows} records, the manifest says {s['records']}")
            tables.append(t)
        if not tables:
            raise DataError(f"{self.path} holds no records")
        table = pa.concat_tables(tables)
        ids = table.column("input_ids").combine_chunks()
        mask = table.column("loss_mask").combine_chunks()
        self._offsets = ids.offsets.to_numpy().astype(np.int64)  # [N + 1]
        self._tokens = ids.values.to_numpy()  # [total tokens] int32
        self._mask = mask.values.to_numpy()  # [total tokens] int8
        if len(self._mask) != len(self._tokens):
            raise DataError(f"{self.path}: loss_mask and input_ids lengths differ")
        self._lengths = np.diff(self._offsets)  # [N]
        self._prompt_len = table.column("prompt_len").to_numpy()
        self._ids = table.column("id").to_pylist()
        self._sources = table.column("source").to_pylist()

    # ------------------------------------------------------------------------------- records
    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:  # [N] tokens per record (before the max_length cap)
        return self._lengths

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self._mask.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> Record:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self._offsets[i], self._offsets[i + 1]
        return Record(self._ids[i], self._sources[i], int(self._prompt_len[i]), self._tokens[a:b], self._mask[a:b])

    def collate(self, indices) -> Batch:
        """Pad the records ``indices`` (in that order) into one batch."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        lens = np.minimum(self._lengths[idx], self.max_length)
        S = int(lens.max())
        input_ids = np.full((len(idx), S), self.pad_token_id, dtype=np.int64)  # [B, S]
        loss_mask = np.zeros((len(idx), S), dtype=np.int64)  # [B, S]
        attention = np.zeros((len(idx), S), dtype=np.int64)  # [B, S]
        for row, (i, n) in enumerate(zip(idx, lens)):
            a = self._offsets[i]
            input_ids[row, :n] = self._tokens[a : a + n]
            loss_mask[row, :n] = self._mask[a : a + n]
            attention[row, :n] = 1
        return Batch(torch.from_numpy(input_ids), torch.from_numpy(loss_mask), torch.from_numpy(attention),
                     torch.from_numpy(idx))

    # ------------------------------------------------------------------------------ batching
    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of record positions ``[N]`` (same on every rank)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
        return rng.permutation(len(self))

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return len(self) // (batch_size * world_size)

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch, from ``start_step`` on (see the module docstring)."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size "
                             f"(got {batch_size}, {world_size}, {rank})")
        steps = self.steps_per_epoch(batch_size, world_size)
        if steps == 0:
            raise DataError(f"{self.path}: {len(self)} records are fewer than one global batch "
                            f"({batch_size} x {world_size} ranks)")
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
        perm = self.order(seed, epoch)
        for step in range(start_step, steps):
            lo = (step * world_size + rank) * batch_size
            yield self.collate(perm[lo : lo + batch_size])
