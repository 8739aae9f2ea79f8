"""Disaggregated drafting for a tensor-parallel replica: one draft-worker session per replica.

The ranks of a :class:`~dspark.verifier_service.tp.group.TPGroup` run their engines in lockstep,
so they must take every drafting decision alike. With a colocated drafter that holds by itself
(same inputs, same drafter on every rank). With a remote drafter it would not: each rank would
open its own session, pay its own RPC and could see its own timeout. So only rank 0 talks to the
draft worker; :class:`BroadcastDrafter` wraps its ``RemoteDrafter`` and, on every call the engine
makes (``append_context``, ``reset_slot``, ``move_slot``, ``truncate``, ``context_length``,
``propose``), broadcasts the *outcome* (the value, or which error) to the other ranks, whose
``BroadcastDrafter`` has no inner drafter and returns or raises exactly that. The engine's calls
come in the same order on every rank, so each call is one ``broadcast_object_list`` over the
group's process group (gloo on CPU, nccl on GPU).

Random streams: ``RemoteDrafter.propose`` draws one seed per unseeded sampled row from the
request's generator before anything else; followers draw the same (``row_seeds``), so the
per-request generators stay identical across ranks and so do the uniforms of rejection sampling.
Seeded rows draw nothing: their noise is position-keyed, the same on every rank.
"""

from __future__ import annotations

from typing import Any, Callable

from dspark.platform.sampling import row_seeds

__all__ = ["BroadcastDrafter", "DraftFailed"]


class DraftFailed(RuntimeError):
    """Rank 0's drafter raised (its message, e.g. a lost draft-worker session or a timeout): the
    engine treats it as rank 0 treats the original, on every rank (the step decodes plainly, or the
    request stops drafting when its context could not be sent)."""


class BroadcastDrafter:
    def __init__(self, inner: Any | None, block_size: int, vocab_size: int, *, group: Any = None):
        self.inner = inner  # rank 0: the RemoteDrafter; other ranks: None
        self.block_size = int(block_size)
        self.vocab_size = int(vocab_size)
        self.group = group

    @property
    def leader(self) -> bool:
        return self.inner is not None

    def __getattr__(self, name: str) -> Any:  # counters (calls, sent_bytes, ...) of rank 0's drafter
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(inner, name)

    def _share(self, fn: Callable[[], Any]) -> Any:
        import torch
        import torch.distributed as dist

        error: BaseException | None = None
        box: list[Any] = [None]
        if self.leader:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:
                box[0], error = ("error", f"{type(exc).__name__}: {exc}"), exc
        device = None
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        dist.broadcast_object_list(box, src=0, group=self.group, device=device)
        status, value = box[0]
        if status == "ok":
            return value
        if error is not None:
            raise error
        raise DraftFailed(value)

    # -- the engine's drafter interface ------------------------------------------------------------
    def allocate(self, max_slots: int, max_len: int) -> None:
        if self.leader:  # local state only: no outcome to share
            self.inner.allocate(max_slots, max_len)

    def append_context(self, slots, tokens, features, last_hidden, lengths) -> None:
        return self._share(lambda: self.inner.append_context(slots, tokens, features, last_hidden, lengths))

    def reset_slot(self, slot: int) -> None:
        return self._share(lambda: self.inner.reset_slot(slot))

    def move_slot(self, src: int, dst: int) -> None:
        return self._share(lambda: self.inner.move_slot(src, dst))

    def truncate(self, slot: int, length: int) -> None:
        return self._share(lambda: self.inner.truncate(slot, length))

    def context_length(self, slot: int) -> int:
        return self._share(lambda: self.inner.context_length(slot))

    def propose(self, slots, anchors, positions, sampling):
        if not self.leader:
            row_seeds(sampling)  # what the leader's RemoteDrafter.propose draws first
        return self._share(lambda: self.inner.propose(slots, anchors, positions, sampling))
