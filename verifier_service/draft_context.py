"""Keeping the drafter's context in step with the committed tokens, with deferred appends.

After every verify step the committed tokens' target features must reach the drafter's context
(its KV projection of them), or it cannot draft the next block. When the step's policy decided not
to draft (the draft pass would not pay, e.g. at high load), projecting them at once would still
cost a drafter forward per step for nothing drafted. :class:`DraftContext` can instead keep them
(a copy of the committed rows' features) per slot and hand them over later in one batched
``append_context``: before the slot's next draft pass, or when it holds ``max_pending`` tokens
(which bounds the memory: max_pending × (features + hidden) per slot). The drafter sees exactly
the same context either way, only later, so drafts (and outputs) are unchanged.

Contract with the drafter: ``dspark.drafter_service.base.Drafter`` (append_context, reset_slot,
move_slot). A failing call reports the slots it concerned; the engine then stops drafting for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DraftContext"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    tokens: list[torch.Tensor]  # each [n] int64
    features: list[torch.Tensor]  # each [n, F] (views into one step's copy)
    last_hidden: list[torch.Tensor]  # each [n, d]
    length: int = 0  # Σ n


class DraftContext:
    """The engine's side of the drafter's context: immediate or deferred appends per slot."""

    def __init__(self, drafter: Any, max_pending: int = 64):
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self.drafter = drafter
        self.max_pending = max_pending  # 0 = never defer
        self._pending: dict[int, _Pending] = {}
        self.deferred_tokens = 0  # tokens whose append was deferred (counter)
        self.flushes = 0  # batched hand-overs of deferred tokens

    def pending(self, slot: int) -> int:
        p = self._pending.get(slot)
        return p.length if p is not None else 0

    def append(
        self,
        slots: Sequence[int],  # [R]
        tokens: torch.Tensor,  # [R, k] int64, right-padded
        features: torch.Tensor,  # [R, k', F], k' >= k
        last_hidden: torch.Tensor,  # [R, k', d]
        lengths: torch.Tensor,  # [R] valid rows per slot
        *,
        defer: bool = False,
    ) -> list[int]:
        """Add committed tokens to each slot's context -> the slots whose append failed.

        Deferred appends are kept (copied) until :meth:`flush`; a slot reaching ``max_pending``
        tokens is flushed at once. Tokens already pending for a slot are always handed over
        before new immediate ones, so the context keeps its order."""
        k = tokens.shape[1]
        if not defer or self.max_pending == 0:
            failed = self.flush([s for s in slots if s in self._pending])
            ok = [i for i, s in enumerate(slots) if s not in failed]
            if ok:
                failed += self._call([slots[i] for i in ok], tokens[ok], features[ok, :k], last_hidden[ok, :k], lengths[ok])
            return failed
        # one copy per step (the slices below are views of it), not one per request
        tokens, features, last_hidden = tokens.clone(), features[:, :k].clone(), last_hidden[:, :k].clone()
        full = []
        for i, (s, n) in enumerate(zip(slots, lengths.tolist())):
            if n == 0:
                continue
            p = self._pending.get(s)
            if p is None:
                p = self._pending[s] = _Pending([], [], [])
            p.tokens.append(tokens[i, :n])
            p.features.append(features[i, :n])
            p.last_hidden.append(last_hidden[i, :n])
            p.length += n
            self.deferred_tokens += n
            if p.length >= self.max_pending:
                full.append(s)
        return self.flush(full)

    def flush(self, slots: Sequence[int] | None = None) -> list[int]:
        """Hand the pending tokens of ``slots`` (None = all) to the drafter in one batched
        ``append_context`` -> the slots whose append failed."""
        todo = [s for s in (self._pending if slots is None else slots) if s in self._pending]
        if not todo:
            return []
        items = [self._pending.pop(s) for s in todo]
        lens = torch.tensor([p.length for p in items])  # [R]
        n = int(lens.max())
        first = items[0]
        tokens = torch.zeros((len(items), n), dtype=torch.long)  # [R, n] right-padded
        feats = first.features[0].new_zeros((len(items), n, first.features[0].shape[-1]))  # [R, n, F]
        hidden = first.last_hidden[0].new_zeros((len(items), n, first.last_hidden[0].shape[-1]))  # [R, n, d]
        for i, p in enumerate(items):
            m = int(lens[i])
            tokens[i, :m] = torch.cat(p.tokens).to(tokens.device)
            feats[i, :m] = torch.cat(p.features)
            hidden[i, :m] = torch.cat(p.last_hidden)
        self.flushes += 1
        return self._call(todo, tokens, feats, hidden, lens)

    def reset(self, slot: int) -> None:
        self._pending.pop(slot, None)
        self.drafter.reset_slot(slot)

    def move(self, src: int, dst: int) -> None:
        """Move ``src``'s context (and pending tokens) to ``dst``."""
        self._pending.pop(dst, None)
        if src in self._pending:
            self._pending[dst] = self._pending.pop(src)
        self.drafter.move_slot(src, dst)

    def _call(self, slots: list[int], tokens, features, last_hidden, lengths) -> list[int]:
        try:
            self.drafter.append_context(torch.tensor(slots), tokens, features, last_hidden, lengths)
            return []
        except Exception:
            log.exception("drafter.append_context failed; %d request(s) continue without drafts", len(slots))
            return list(slots)
