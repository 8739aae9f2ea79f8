"""The draft worker's logic (no Ray): sessions of drafter context, one per verifier replica.

A verifier replica in the disaggregated topology drafts through a :class:`DraftWorkerCore` on
another process (the ``DraftWorker`` Serve deployment is a thin shim over it). Each replica owns
a *session*: a drafter whose context cache mirrors the replica's slots. Calls carry the context
changes queued since the last call and the proposal (``dspark.platform.contracts.DraftCall``), so
a drafting step costs one round trip.

Sessions are soft state. A worker that restarts has none; a call that names an epoch the worker
does not hold is answered ``lost`` (nothing applied, nothing drafted), and the replica rebuilds
its contexts (``dspark.drafter_service.remote``). Sessions beyond ``max_sessions`` are evicted
least recently used (their replicas then see ``lost``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
from typing import Any, Callable

import torch

from dspark.platform.contracts import SCHEMA_VERSION, DraftCall, DraftOp, DraftProposal, DraftReply
from dspark.platform.sampling import SamplingBatch

__all__ = ["DraftWorkerCore"]

log = logging.getLogger(__name__)

_EPOCHS = itertools.count(int.from_bytes(os.urandom(3), "big") << 20)  # distinct across restarts


class _Session:
    def __init__(self, drafter: Any, max_slots: int, max_len: int):
        self.drafter = drafter
        self.shape = (max_slots, max_len)
        self.epoch = next(_EPOCHS)
        self.applied = 0  # ops of the stream applied so far
        drafter.allocate(max_slots, max_len)


class DraftWorkerCore:
    """``drafter_factory()`` builds one drafter (weights loaded); it is called per session."""

    def __init__(self, drafter_factory: Callable[[], Any], *, max_sessions: int = 8, name: str | None = None):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.factory = drafter_factory
        self.max_sessions = max_sessions
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._lock = threading.Lock()  # one call at a time per worker (the drafter is not thread-safe)
        self.calls = 0

    def call(self, call: DraftCall) -> DraftReply:
        if call.schema_version != SCHEMA_VERSION:
            raise ValueError(f"draft call schema {call.schema_version} != {SCHEMA_VERSION}")
        with self._lock:
            self.calls += 1
            s = self._sessions.get(call.session)
            if s is not None and s.shape != (call.max_slots, call.max_len):
                s = None  # the replica was rebuilt with another shape: start over
            if s is None:
                s = self._new_session(call)
                if call.epoch is not None:  # the caller's context lived in a session this worker lost
                    return DraftReply(s.epoch, lost=True, worker=self.name)
            elif call.epoch is not None and call.epoch != s.epoch:
                return DraftReply(s.epoch, lost=True, worker=self.name)
            self._sessions.move_to_end(call.session)
            if call.first_op > s.applied:  # ops in between never arrived: the context is unknown
                self._sessions.pop(call.session)
                return DraftReply(self._new_session(call).epoch, lost=True, worker=self.name)
            for op in call.ops[s.applied - call.first_op:]:  # skip what a retried call already applied
                _apply(s.drafter, op)
                s.applied += 1
            if call.proposal is None:
                return DraftReply(s.epoch, worker=self.name)
            return _propose(s.drafter, call.proposal, s.epoch, self.name)

    def _new_session(self, call: DraftCall) -> _Session:
        while len(self._sessions) >= self.max_sessions:
            old, _ = self._sessions.popitem(last=False)
            log.info("draft worker %s: evicting session %s", self.name, old)
        s = _Session(self.factory(), call.max_slots, call.max_len)
        self._sessions[call.session] = s
        return s

    def drop(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)


def _apply(drafter: Any, op: DraftOp) -> None:
    if op.kind == "append":
        dev = drafter.device
        drafter.append_context(torch.as_tensor(op.slots), op.tokens.to(dev), op.features.to(dev),
                               op.last_hidden.to(dev), op.lengths)
    elif op.kind == "reset":
        for slot in op.slots:
            drafter.reset_slot(slot)
    elif op.kind == "move":
        drafter.move_slot(op.slots[0], op.arg)
    else:
        drafter.truncate(op.slots[0], op.arg)


@torch.no_grad()
def _propose(drafter: Any, p: DraftProposal, epoch: int, name: str) -> DraftReply:
    gens = [torch.Generator().manual_seed(int(sd)) if sd is not None else None for sd in p.seeds]
    sampling = SamplingBatch(torch.tensor(p.temperature, dtype=torch.float32), torch.tensor(p.top_k, dtype=torch.int64),
                             torch.tensor(p.top_p, dtype=torch.float32), gens, list(p.keys), list(p.offsets))
    block = drafter.propose(torch.tensor(p.slots), torch.tensor(p.anchors), torch.tensor(p.positions), sampling)
    want = [i for i, w in enumerate(p.want_logits) if w]
    logits = block.logits[want].float().cpu() if want else None  # [R_s, γ, V]
    conf = block.confidences.float().cpu() if block.confidences is not None else None
    return DraftReply(epoch, tokens=block.tokens.cpu(), confidences=conf, logits=logits, worker=name)
