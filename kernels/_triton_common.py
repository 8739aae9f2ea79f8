"""Helpers shared by the Triton kernel modules (imported only by them: this module imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["is_interpreted", "tile_argmax"]


def is_interpreted(kernel) -> bool:
    """The kernel was decorated while ``TRITON_INTERPRET`` was on (it then runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def tile_argmax(score, offs, best_val, best_idx, n):
    """Fold one tile into a running (max, first index of the max).

    ``score`` [BLOCK] holds -inf in masked lanes. Ties resolve to the smallest index, as
    ``torch.argmax`` does: within a tile through the min over tied offsets, across tiles because
    a later tile replaces the running best only when strictly greater.
    """
    tile_max = tl.max(score, axis=0)
    tile_idx = tl.min(tl.where(score == tile_max, offs, n), axis=0)
    take = tile_max > best_val
    return tl.where(take, tile_max, best_val), tl.where(take, tile_idx, best_idx)
