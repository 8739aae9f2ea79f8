"""The verifier replica's side of the scheduler protocol (``dspark.scheduler.actor``).

A :class:`SchedulerClient` runs beside the engine's step loop, on its own daemon thread: it
registers the replica, sends a heartbeat every ``interval_s`` (load, queue, running requests,
recent acceptance) and keeps the budget each reply carries. The step loop only ever calls
:meth:`SchedulerClient.current_budget` (a read of one immutable snapshot) and
:meth:`SchedulerClient.observe_step` (an append under a short lock), so nothing the scheduler
does, including dying or hanging, can block or fail a step.

Failure behaviour:

* every exchange is bounded: the calls of one heartbeat share a deadline of ``timeout_s``, and
  a slow scheduler is not sent a new call while an old one is outstanding (the transport's job);
* a budget is applied for its lease (``valid_s`` of the reply) after it arrived, then the
  configured ``default_budget_tokens`` (None = no cap: the local policy decides alone);
* a reply with ``registered=False`` (the scheduler restarted, or dropped this replica as stale)
  makes the client register again and repeat the heartbeat at once, in the same exchange.

The transport is injected: :class:`dspark.scheduler.actor.RaySchedulerTransport` in serving,
any object with the same three methods in tests. This module imports no Ray and no torch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pydantic import Field, model_validator

from dspark.platform.config import StrictModel
from dspark.platform.contracts import BudgetReply, Heartbeat, ReplicaInfo
from dspark.scheduler.sps import SPSProfile

__all__ = [
    "SchedulerClientConfig",
    "SchedulerTransport",
    "ReplicaSnapshot",
    "replica_info",
    "engine_probe",
    "nvml_utilization",
    "LoadMeter",
    "AcceptanceMeter",
    "ClientStatus",
    "SchedulerClient",
]

log = logging.getLogger(__name__)


class SchedulerClientConfig(StrictModel):
    """Settings of a replica's scheduler client."""

    name: str = Field("dspark-scheduler", min_length=1, description="Ray name of the scheduler actor.")
    namespace: str = Field("dspark", min_length=1, description="Ray namespace of the scheduler actor.")
    interval_s: float = Field(1.0, gt=0, description="Seconds between heartbeats.")
    timeout_s: float = Field(
        0.5, gt=0, description="Most seconds one heartbeat exchange may take (registration included)."
    )
    default_budget_tokens: int | None = Field(
        None, ge=0, description="Verify budget (draft tokens per step) used when no valid budget from the "
        "scheduler is at hand; None = no cap."
    )
    load_window_s: float = Field(10.0, gt=0, description="Window of the load and acceptance measurements.")
    use_nvml: bool = Field(True, description="Measure load as GPU utilisation through NVML where available.")
    nvml_device: int = Field(0, ge=0, description="CUDA device index of the replica (as torch numbers it).")

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> "SchedulerClientConfig":
        if self.timeout_s > self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s})")
        return self


class SchedulerTransport(Protocol):
    """How the client reaches the scheduler. Each call returns within ``timeout_s`` or raises."""

    def register(self, info: ReplicaInfo, timeout_s: float) -> BudgetReply: ...

    def heartbeat(self, hb: Heartbeat, timeout_s: float) -> BudgetReply: ...

    def deregister(self, replica_id: str, timeout_s: float) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSnapshot:
    """The engine's counters at one instant."""

    running: int
    queue_depth: int
    busy_s: float  # cumulative seconds spent inside the step loop (prefill + draft + verify)


def replica_info(replica_id: str, profile: SPSProfile, *, max_batch_size: int, gamma: int,
                 node: str | None = None) -> ReplicaInfo:
    """The registration of a replica from its step-cost profile: the profile's points as the
    table, and its identity (target, device, dtype, config hash) plus a hash of the numbers as
    ``sps_id``, so a re-measured profile registers as a new one."""
    base = ReplicaInfo(replica_id, node or socket.gethostname(), max_batch_size, gamma,
                       tuple(zip(profile.tokens, profile.steps_per_s)), draft_table=profile.draft_points)
    ident = "/".join(str(v) for v in (profile.target, profile.device, profile.dtype, profile.config_hash) if v)
    return dataclasses.replace(base, sps_id=f"{ident}:{base.sps_id}") if ident else base


def engine_probe(engine: Any) -> Callable[[], ReplicaSnapshot]:
    """A snapshot reader over a ``VerifierEngine`` (``num_running``, ``waiting``, ``timings``).
    Only plain attribute and length reads, so it is safe to call from the client's thread."""

    def probe() -> ReplicaSnapshot:
        t = engine.timings
        return ReplicaSnapshot(int(engine.num_running), len(engine.waiting), float(t.prefill_s + t.draft_s + t.verify_s))

    return probe


def nvml_utilization(device_index: int = 0) -> Callable[[], float] | None:
    """A reader of the GPU's utilisation in [0, 1] through NVML (the fraction of the driver's
    last sample period with a kernel running), or None where ``pynvml`` is missing, there is no
    GPU, or the device does not report utilisation (MIG slices, for instance).
    ``device_index`` is the CUDA index; it is mapped through ``CUDA_VISIBLE_DEVICES``."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        ref = visible[device_index] if visible else str(device_index)
        if ref.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(ref))
        else:  # GPU-/MIG- UUID
            handle = pynvml.nvmlDeviceGetHandleByUUID(ref)
        pynvml.nvmlDeviceGetUtilizationRates(handle)  # fails here, once, where it is not supported
    except Exception:
        return None
    return lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0


class LoadMeter:
    """The replica's load over the last ``window_s``: the mean GPU utilisation read at each
    sample where a reader is given (``source == "nvml"``), else the busy fraction of the step
    loop: Δ(busy seconds) / Δ(wall seconds) between the oldest sample in the window and now.

    A GPU reader that fails is dropped for good and the meter falls back to the busy fraction.
    Not thread-safe: one thread (the client's) samples it.
    """

    def __init__(self, window_s: float = 10.0, *, gpu: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._gpu = gpu
        self._busy: collections.deque[tuple[float, float]] = collections.deque()  # (time, cumulative busy s)
        self._util: collections.deque[tuple[float, float]] = collections.deque()  # (time, utilisation)

    @property
    def source(self) -> str:
        return "nvml" if self._gpu is not None else "busy"

    def sample(self, busy_s: float) -> float:
        now = self.clock()
        if self._busy and busy_s < self._busy[-1][1]:  # the counter restarted (a new engine)
            self._busy.clear()
        self._busy.append((now, busy_s))
        # keep one sample at or before the window's start as the baseline
        while len(self._busy) > 2 and self._busy[1][0] <= now - self.window_s:
            self._busy.popleft()
        if self._gpu is not None:
            try:
                self._util.append((now, _unit(self._gpu())))
                while self._util[0][0] < now - self.window_s:
                    self._util.popleft()
                return sum(u for _, u in self._util) / len(self._util)
            except Exception:
                log.warning("GPU utilisation unreadable; measuring load as the step loop's busy fraction", exc_info=True)
                self._gpu = None
        t0, b0 = self._busy[0]
        return _unit((busy_s - b0) / (now - t0)) if now > t0 else 0.0


class AcceptanceMeter:
    """Acceptance of the recent verify steps, fed by the engine's ``observer`` hook with its
    ``StepRecord``s (``lengths`` ℓ_r, ``accepted`` a_r, ``fallback``).

    α (mean conditional acceptance) is estimated as Σa / Σ(a + [a < ℓ]) over rows that verified
    drafts: each accepted draft is a success and the first rejection, if any, the one failure
    (drafts after it were never tried). This is the maximum-likelihood α of a geometric
    acceptance model; it measures the drafts the policy chose to verify. τ is the mean tokens
    emitted per request-step, 1 + a_r, over all rows (fallback steps count with a = 0).
    ``observe`` runs on the step loop's thread and ``summary`` on the client's: both hold a lock
    for a few arithmetic operations only.
    """

    def __init__(self, window_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic, max_steps: int = 4096):
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._steps: collections.deque[tuple[float, int, int, int, int]] = collections.deque(maxlen=max_steps)

    def observe(self, record: Any) -> None:
        accepted = trials = 0
        for length, a in zip(record.lengths, record.accepted):
            if length > 0:
                accepted += a
                trials += a + (1 if a < length else 0)
        rows = len(record.lengths)
        emitted = rows + sum(int(a) for a in record.accepted)
        with self._lock:
            self._steps.append((self.clock(), accepted, trials, rows, emitted))

    def summary(self) -> tuple[float | None, float | None]:
        """(α, τ) over the window; None where the window holds no data for it."""
        cutoff = self.clock() - self.window_s
        with self._lock:
            while self._steps and self._steps[0][0] < cutoff:
                self._steps.popleft()
            acc = sum(s[1] for s in self._steps)
            trials = sum(s[2] for s in self._steps)
            rows = sum(s[3] for s in self._steps)
            emitted = sum(s[4] for s in self._steps)
        return (acc / trials if trials else None), (emitted / rows if rows else None)


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x))) if math.isfinite(x) else 0.0


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientStatus:
    """What the client has done, for metrics and tests."""

    registered: bool
    epoch: str | None  # the scheduler instance of the last reply
    view_version: int | None
    budget_tokens: int | None  # what current_budget() returns now
    budget_from_scheduler: bool  # False: the local default is in force
    exchanges: int  # heartbeat exchanges that got an answer
    failures: int  # heartbeat exchanges that did not
    registrations: int
    last_error: str | None
    last_exchange_s: float  # duration of the latest exchange
    max_exchange_s: float  # the longest exchange so far


class SchedulerClient:
    """Registers a replica with the scheduler and keeps its verify budget current (see the
    module docstring). ``tick()`` is one exchange and never raises; ``start()`` runs it every
    ``interval_s`` on a daemon thread."""

    def __init__(self, info: ReplicaInfo, transport: SchedulerTransport, config: SchedulerClientConfig | None = None, *,
                 probe: Callable[[], ReplicaSnapshot], load_meter: LoadMeter | None = None,
                 acceptance: AcceptanceMeter | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.info = info
        self.transport = transport
        self.config = config or SchedulerClientConfig()
        self.probe = probe
        self.clock = clock
        self.wall_clock = wall_clock
        if load_meter is None:
            gpu = nvml_utilization(self.config.nvml_device) if self.config.use_nvml else None
            load_meter = LoadMeter(self.config.load_window_s, gpu=gpu, clock=clock)
        self.load_meter = load_meter
        self.acceptance = acceptance or AcceptanceMeter(self.config.load_window_s, clock=clock)
        # (tokens, expires at on self.clock, epoch, view version): replaced whole, read whole
        self._budget: tuple[int, float, str, int] | None = None
        self._registered = False
        self._seq = 0
        self._exchanges = self._failures = self._registrations = 0
        self._last_error: str | None = None
        self._last_s = self._max_s = 0.0
        self._epoch: str | None = None
        self._version: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ step-loop side
    def current_budget(self) -> int | None:
        """The verify budget to apply to the next step: the scheduler's while its lease holds,
        else the configured default. Never blocks."""
        b = self._budget
        if b is not None and self.clock() < b[1]:
            return b[0]
        return self.config.default_budget_tokens

    def observe_step(self, record: Any) -> None:
        """A step observer for the engine (`engine.add_observer(client.observe_step)`). Never raises."""
        try:
            self.acceptance.observe(record)
        except Exception:  # a malformed record must not fail the step
            log.debug("could not read a step record", exc_info=True)

    # ------------------------------------------------------------------ exchange
    def tick(self) -> bool:
        """One heartbeat exchange (registering first if needed). True if the scheduler answered."""
        start = self.clock()
        deadline = start + self.config.timeout_s
        try:
            if not self._registered:
                self._register(deadline)
            reply = self.transport.heartbeat(self._heartbeat(), self._left(deadline))
            if not reply.registered:  # the scheduler restarted or forgot us: register and repeat
                self._registered = False
                self._register(deadline)
                reply = self.transport.heartbeat(self._heartbeat(), self._left(deadline))
            self._accept(reply)
            self._exchanges += 1
            if self._last_error is not None:
                log.info("scheduler reachable again (epoch %s)", reply.epoch)
            self._last_error = None
            return True
        except Exception as e:
            if self._last_error is None:
                log.warning("scheduler unreachable, keeping the last budget for its lease: %s", e)
            self._failures += 1
            self._last_error = f"{type(e).__name__}: {e}"
            return False
        finally:
            self._last_s = self.clock() - start
            self._max_s = max(self._max_s, self._last_s)

    def _left(self, deadline: float) -> float:
        left = deadline - self.clock()
        if left <= 0:
            raise TimeoutError("heartbeat exchange ran out of time")
        return left

    def _register(self, deadline: float) -> None:
        reply = self.transport.register(self.info, self._left(deadline))
        self._registered = True
        self._registrations += 1
        self._accept(reply)

    def _heartbeat(self) -> Heartbeat:
        snap = self.probe()
        load = self.load_meter.sample(snap.busy_s)
        alpha, tau = self.acceptance.summary()
        self._seq += 1
        return Heartbeat(
            replica_id=self.info.replica_id, seq=self._seq, timestamp=self.wall_clock(), load=load,
            load_source=self.load_meter.source, queue_depth=int(snap.queue_depth), running=int(snap.running),
            accept_rate=alpha, tau=tau,
        )

    def _accept(self, reply: BudgetReply) -> None:
        self._epoch, self._version = reply.epoch, reply.view_version
        if reply.registered and reply.budget_tokens is not None:
            self._budget = (int(reply.budget_tokens), self.clock() + reply.valid_s, reply.epoch, reply.view_version)

    # ------------------------------------------------------------------ thread
    def start(self) -> "SchedulerClient":
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"scheduler-client-{self.info.replica_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = self.clock()
            self.tick()
            self._stop.wait(max(0.0, self.config.interval_s - (self.clock() - t0)))

    def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; with ``deregister`` tell the scheduler (best effort, bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.interval_s + self.config.timeout_s + 1.0)
            self._thread = None
        if deregister and self._registered:
            try:
                self.transport.deregister(self.info.replica_id, self.config.timeout_s)
            except Exception as e:
                log.info("could not deregister from the scheduler: %s", e)
            self._registered = False

    def status(self) -> ClientStatus:
        b = self._budget
        live = b is not None and self.clock() < b[1]
        return ClientStatus(
            registered=self._registered, epoch=self._epoch, view_version=self._version,
            budget_tokens=self.current_budget(), budget_from_scheduler=live, exchanges=self._exchanges,
            failures=self._failures, registrations=self._registrations, last_error=self._last_error,
            last_exchange_s=self._last_s, max_exchange_s=self._max_s,
        )
