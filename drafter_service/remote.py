"""A drafter on another process, seen by the verifier engine as a local one.

:class:`RemoteDrafter` implements the engine's side of ``dspark.drafter_service.base.Drafter``
(allocate, append_context, reset_slot, move_slot, truncate, context_length, propose) by queueing
the context changes and sending them with the next proposal in one :class:`DraftCall` through a
``transport`` (a callable; in serving, a Ray Serve handle call with a timeout). So a drafting step
costs one round trip, and a step that does not draft costs none.

Failure contract (what keeps requests alive when a worker dies or stalls):
* a transport error or timeout raises from ``propose``: the engine decodes that step plainly;
  the queued ops are kept and re-sent, so a transient error loses nothing;
* after a failed call the worker is not called again for a back-off (``retry_min_s``, doubling up
  to ``retry_max_s`` while calls keep failing, reset by any answer): meanwhile ``propose`` raises
  :class:`DraftWorkerUnavailable` at once, so while a worker restarts or stays away the steps
  decode plainly at full speed instead of each waiting out the transport's timeout;
* a ``lost`` reply (the worker no longer holds this replica's session: restart, eviction) marks
  every slot's context stale and raises; ``append_context`` on a stale slot raises, so the engine
  stops drafting for the requests in flight (they finish with plain decoding) while slots reset
  by new requests draft again on the new session: speculation resumes by itself.
Draft logits come back only for rows that sample (``want_logits``); greedy rows get a zero
placeholder, which greedy verification never reads.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from dspark.platform.contracts import DraftCall, DraftOp, DraftProposal, DraftReply
from dspark.platform.sampling import SamplingBatch, row_seeds

__all__ = ["DraftSessionLost", "DraftWorkerUnavailable", "RemoteBlock", "RemoteDrafter", "RemoteDrafterSpec",
           "payload_bytes"]


class DraftSessionLost(RuntimeError):
    """The draft worker no longer holds this replica's contexts."""


class DraftWorkerUnavailable(RuntimeError):
    """A recent call to the draft worker failed: no call is made until its back-off has passed."""


@dataclass
class RemoteBlock:
    tokens: torch.Tensor  # [R, γ] int64
    logits: torch.Tensor  # [R, γ, V] float32 (zeros for greedy rows) or [R, γ, 0] when all are greedy
    confidences: torch.Tensor | None  # [R, γ] float32


def payload_bytes(obj) -> int:
    """Bytes of the tensors in a DraftCall / DraftReply (what crosses the process boundary,
    besides a few ids and numbers)."""
    total = 0
    items = [obj] + list(getattr(obj, "ops", ())) + ([obj.proposal] if getattr(obj, "proposal", None) else [])
    for item in items:
        for v in vars(item).values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


@dataclass(frozen=True)
class RemoteDrafterSpec:
    """A picklable recipe for a ``RemoteDrafter`` (built where it is used, e.g. in a rank actor)."""

    transport: Callable[[DraftCall], DraftReply]
    block_size: int
    vocab_size: int
    session: str | None = None

    def __call__(self) -> "RemoteDrafter":
        return RemoteDrafter(self.transport, self.block_size, self.vocab_size, session=self.session)


class RemoteDrafter:
    """The engine-side proxy of a draft worker session (one per verifier replica)."""

    def __init__(self, transport: Callable[[DraftCall], DraftReply], block_size: int, vocab_size: int,
                 *, session: str | None = None, max_pending_bytes: int = 64 << 20, retry_min_s: float = 0.5,
                 retry_max_s: float = 8.0, clock: Callable[[], float] = time.monotonic):
        self.transport = transport
        self.retry_min_s, self.retry_max_s, self.clock = retry_min_s, retry_max_s, clock
        self._backoff = 0.0
        self._retry_at = 0.0  # on self.clock: no call before this after a failure
        self.block_size = int(block_size)
        self.vocab_size = int(vocab_size)
        self.session = session or f"replica-{uuid.uuid4().hex[:12]}"
        self.max_pending_bytes = max_pending_bytes
        self.epoch: int | None = None
        self._ops: list[DraftOp] = []
        self._acked = 0  # ops of this session's stream the worker has confirmed
        self._pending_bytes = 0
        self._lengths: list[int] = []
        self._stale: set[int] = set()
        self._shape = (0, 0)
        self._lock = threading.Lock()
        # counters (read by metrics and the serving benchmark)
        self.calls = self.failures = self.sessions_lost = 0
        self.backed_off = 0  # calls not made because the worker failed recently
        self.sent_bytes = self.received_bytes = 0
        self.last_worker = ""

    # -- context (queued) ----------------------------------------------------------------------
    def allocate(self, max_slots: int, max_len: int) -> None:
        self._shape = (int(max_slots), int(max_len))
        self._lengths = [0] * max_slots
        self._ops.clear()
        self._acked = 0
        self.epoch = None  # a new session shape: the worker starts one

    def append_context(self, slots, tokens, features, last_hidden, lengths) -> None:
        ids = [int(s) for s in slots]
        stale = [s for s in ids if s in self._stale]
        if stale:
            raise DraftSessionLost(f"the draft worker lost the context of slots {stale}")
        k = tokens.shape[1]
        op = DraftOp("append", tuple(ids), tokens.cpu(), features[:, :k].cpu(), last_hidden[:, :k].cpu(),
                     torch.as_tensor(lengths).cpu())
        self._queue(op)
        for s, n in zip(ids, torch.as_tensor(lengths).tolist()):
            self._lengths[s] += int(n)

    def context_length(self, slot: int) -> int:
        return self._lengths[slot]

    def reset_slot(self, slot: int) -> None:
        self._stale.discard(slot)
        self._lengths[slot] = 0
        self._queue(DraftOp("reset", (int(slot),)))

    def move_slot(self, src: int, dst: int) -> None:
        self._lengths[dst] = self._lengths[src]
        self._stale.discard(dst)
        if src in self._stale:
            self._stale.add(dst)
        self._queue(DraftOp("move", (int(src),), arg=int(dst)))

    def truncate(self, slot: int, length: int) -> None:
        self._lengths[slot] = min(self._lengths[slot], int(length))
        self._queue(DraftOp("truncate", (int(slot),), arg=int(length)))

    def _queue(self, op: DraftOp) -> None:
        self._ops.append(op)
        self._pending_bytes += payload_bytes(op)
        if self._pending_bytes > self.max_pending_bytes:  # a long run without drafting: ship them now
            try:
                self._send(None)
            except Exception:
                pass  # kept queued; the next call retries

    # -- drafting --------------------------------------------------------------------------------
    def propose(self, slots, anchors, positions, sampling: SamplingBatch) -> RemoteBlock:
        rows = [int(s) for s in slots]
        seeds = row_seeds(sampling)  # first, so the generators advance alike whatever happens next
        stale = [s for s in rows if s in self._stale]
        if stale:
            raise DraftSessionLost(f"the draft worker lost the context of slots {stale}")
        # keyed rows are verified by matching: only unkeyed sampled rows need their draft logits back
        want = tuple(float(t) > 0 and not k for t, k in zip(sampling.temperature.tolist(), sampling.keyed))
        prop = DraftProposal(tuple(rows), tuple(int(a) for a in anchors), tuple(int(p) for p in positions),
                             tuple(float(t) for t in sampling.temperature.tolist()),
                             tuple(int(k) for k in sampling.top_k.tolist()),
                             tuple(float(p) for p in sampling.top_p.tolist()), tuple(seeds), want,
                             tuple(k if keyed else None for k, keyed in zip(sampling.keys, sampling.keyed)),
                             tuple(sampling.offsets))
        reply = self._send(prop)
        R = len(rows)
        logits = torch.zeros((R, self.block_size, self.vocab_size if any(want) else 0), dtype=torch.float32)
        if reply.logits is not None:
            logits[[i for i, w in enumerate(want) if w]] = reply.logits
        return RemoteBlock(reply.tokens, logits, reply.confidences)

    def _send(self, proposal: DraftProposal | None) -> DraftReply:
        with self._lock:
            if self.clock() < self._retry_at:
                self.backed_off += 1
                raise DraftWorkerUnavailable(f"the draft worker failed recently; next try in "
                                             f"{self._retry_at - self.clock():.1f} s")
            call = DraftCall(self.session, self.epoch, self._shape[0], self._shape[1], tuple(self._ops), proposal,
                             first_op=self._acked)
            self.calls += 1
            try:
                reply = self.transport(call)
            except Exception:
                self.failures += 1
                self._backoff = min(self.retry_max_s, max(self.retry_min_s, 2 * self._backoff))
                self._retry_at = self.clock() + self._backoff
                raise
            self._backoff = 0.0  # the worker answers (even `lost`): call it again freely
            self.sent_bytes += payload_bytes(call)
            self.received_bytes += payload_bytes(reply)
            self.last_worker = reply.worker
            if reply.lost:
                self.sessions_lost += 1
                self.epoch = reply.epoch
                self._ops.clear()
                self._acked = 0
                self._pending_bytes = 0
                self._stale = {s for s, n in enumerate(self._lengths) if n > 0}
                raise DraftSessionLost("the draft worker lost this replica's session; contexts are rebuilt as requests restart")
            self.epoch = reply.epoch
            self._acked += len(self._ops)
            self._ops.clear()
            self._pending_bytes = 0
            return reply
