"""What the scheduled policies remember between steps: the prefix survivals of the last few
drafting steps, keyed by request id. Pure numpy, no torch.

Both uses are lossless because the rows are history by the time they are read: they were
recorded when their drafts had already been verified and committed, before the drafts of the
step being decided were sampled.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

import numpy as np

__all__ = ["stale_survival", "SurvivalHistory"]


def stale_survival(
    request_ids: Sequence[str],  # [R] the current requests
    index: Mapping[str, int],  # request id -> row of ``rows``
    rows: np.ndarray,  # [M, γ] survivals recorded some steps ago
) -> np.ndarray | None:
    """[R, γ] recorded survivals for the current requests.

    A request that was not running then (or not drafting) gets the mean of the recorded rows:
    still information from before this step. None when nothing was recorded.
    Example: ids (a, c), index {a: 0, b: 1}, rows [[.9, .81], [.2, .04]] -> [[.9, .81], [.55, .425]].
    """
    if len(rows) == 0:
        return None
    M = len(rows)
    table = np.concatenate([rows, rows.mean(axis=0, keepdims=True)])  # [M+1, γ]: the mean last
    pick = np.fromiter((index.get(rid, M) for rid in request_ids), dtype=np.int64, count=len(request_ids))
    return table[pick]


class SurvivalHistory:
    """The survival rows of the last ``depth`` *drafting* steps (a step whose draft pass was
    skipped records nothing, so "age" counts drafting steps)."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        # newest last: (request id -> row, survivals [M, γ]) of the rows that could verify
        self._steps: collections.deque[tuple[dict[str, int], np.ndarray]] = collections.deque(maxlen=depth)

    def __len__(self) -> int:
        return len(self._steps)

    def record(self, request_ids: Sequence[str], a: np.ndarray, limits: np.ndarray) -> None:
        """Remember this step's survivals ``a`` [R, γ] of the rows that could verify (limit > 0):
        the others carry no drafts."""
        keep = np.flatnonzero(np.asarray(limits) > 0)  # [M]
        self._steps.append(({request_ids[i]: j for j, i in enumerate(keep.tolist())}, np.asarray(a)[keep]))

    def lookup(self, request_ids: Sequence[str], age: int, gamma: int) -> np.ndarray | None:
        """[R, γ] survivals recorded ``age`` drafting steps ago (1 = the latest) for the current
        requests (see :func:`stale_survival`); None when there is no such step, it recorded no
        row, or its γ differs."""
        if not 1 <= age <= len(self._steps):
            return None
        index, rows = self._steps[-age]
        if rows.ndim != 2 or rows.shape[1] != gamma:
            return None
        return stale_survival(request_ids, index, rows)
