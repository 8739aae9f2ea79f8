"""The verifier replica's step loop (no Ray): one engine stepping in a background thread,
requests submitted and streamed from asyncio code.

``ReplicaLoop.submit`` queues a request and returns a :class:`RequestStream`; iterating it yields
the request's ``RequestOutput`` deltas as the engine emits them. Commands (add, abort) are applied
by the loop thread between steps, so the engine is only ever touched by one thread. Contract:

* a request the engine refuses (``RequestRejected``: too long, bad token ids) ends its stream
  with that error at once; nothing else is affected;
* ``RequestStream.cancel()`` (a client that disconnected) aborts the request and frees its KV
  slot at the next step boundary;
* if a step raises, every request in flight ends with the error (``ReplicaError``), the engine
  is cleared and the loop goes on serving new requests: no request hangs;
* ``before_step`` (optional) runs in the loop thread before every step: the place to read the
  scheduler's verify budget.
* ``metrics`` (optional, e.g. ``dspark.platform.observability.recorders.LoopMetrics``) gets
  ``on_step(engine, outputs, busy_s)`` after every step and ``on_idle(engine, busy_s)`` at least
  every ``metrics.idle_interval_s`` while the loop waits; it must not raise.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

from dspark.platform.contracts import GenerationRequest, RequestOutput

__all__ = ["ReplicaError", "ReplicaLoop", "RequestStream"]

log = logging.getLogger(__name__)

_END = object()


class ReplicaError(RuntimeError):
    """The replica failed while running the request (message is for users)."""


class RequestStream:
    """The outputs of one request, as an async iterator (on the submitting event loop)."""

    def __init__(self, loop: "ReplicaLoop", request_id: str, aio: asyncio.AbstractEventLoop):
        self._replica, self.request_id, self._aio = loop, request_id, aio
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def _put(self, item: Any) -> None:  # called from the loop thread
        self._aio.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def cancel(self) -> None:
        if not self.finished:
            self._replica.abort(self.request_id)


class ReplicaLoop:
    def __init__(self, engine: Any, *, before_step: Callable[[Any], None] | None = None, name: str = "replica",
                 metrics: Any = None):
        self.engine = engine
        self.before_step = before_step
        self.metrics = metrics
        self.name = name
        self._streams: dict[str, RequestStream] = {}
        self._commands: list[tuple[str, Any]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self.steps = 0
        self.failed_steps = 0
        self.busy_s = 0.0  # seconds spent inside engine.step (load on CPU)

    def start(self) -> "ReplicaLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; must be called from a running asyncio loop (the stream's)."""
        if not self.alive:
            raise ReplicaError(f"{self.name} is not running")
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        with self._wake:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._streams[request.request_id] = stream
            self._commands.append(("add", request))
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._commands.append(("abort", request_id))
            self._wake.notify()

    # -- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        from dspark.verifier_service.engine import RequestRejected

        while True:
            with self._wake:
                while not self._stop and not self._commands and not self.engine.has_unfinished():
                    if self.metrics is not None:
                        self.metrics.on_idle(self.engine, self.busy_s)
                    self._wake.wait(self.metrics.idle_interval_s if self.metrics is not None else None)
                if self._stop:
                    break
                commands, self._commands = self._commands, []
            for kind, arg in commands:
                if kind == "add":
                    try:
                        self.engine.add_request(arg)
                    except (RequestRejected, ValueError) as exc:
                        self._finish(arg.request_id, exc)
                else:
                    self.engine.abort(arg)
                    self._finish(arg, None)
            if not self.engine.has_unfinished():
                continue
            try:
                if self.before_step is not None:
                    self.before_step(self.engine)
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self.busy_s += time.perf_counter() - t0
                self.steps += 1
            except Exception as exc:  # the engine is in an unknown state: fail what is in flight
                log.exception("%s: engine step failed", self.name)
                self.failed_steps += 1
                self._fail_all(ReplicaError(f"{self.name} failed while decoding: {type(exc).__name__}: {exc}"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            if self.metrics is not None:  # after the outputs went out: recording never delays them
                self.metrics.on_step(self.engine, outputs, self.busy_s)
        self._fail_all(ReplicaError(f"{self.name} stopped"))

    def _finish(self, request_id: str, error: BaseException | None) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(error if error is not None else _END)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._streams):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            self._finish(rid, error)
