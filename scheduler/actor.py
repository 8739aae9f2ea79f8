"""The central scheduler: one named Ray actor that collects every verifier replica's load, queue
and step-cost profile, and hands each replica its verify budget (``dspark.scheduler.budget``).

Protocol (records in ``dspark.platform.contracts``; every call is small and answers at once):

* ``register(ReplicaInfo) -> BudgetReply``: idempotent; a replica registering again (restart,
  new profile) replaces its old entry. The reply carries no budget yet.
* ``heartbeat(Heartbeat) -> BudgetReply``: the replica's latest state in, its budget out. A
  heartbeat from a replica the scheduler does not know (it restarted, or dropped the replica as
  stale) gets ``registered=False`` and no budget: the replica registers again.
* ``deregister(replica_id) -> bool``: a replica leaving cleanly.
* ``cluster_view() -> ClusterView``: the live replicas, their loads, budgets and goodput.

The scheduler holds soft state only: everything it knows is re-sent by the replicas within one
heartbeat interval, so a restarted actor rebuilds its view without any storage. Replicas never
wait for it (see ``dspark.verifier_service.scheduler_client``).

``SchedulerCore`` is the whole logic as a plain class (tested without Ray, with an injectable
clock); ``SchedulerActor`` is the Ray shim and :func:`get_or_create_scheduler` the only place
that applies ``ray.remote``. :class:`RaySchedulerTransport` is what a replica uses to reach it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import Field

from dspark.platform.config import StrictModel
from dspark.platform.contracts import (
    SCHEMA_VERSION,
    BudgetReply,
    ClusterView,
    Heartbeat,
    ReplicaInfo,
    ReplicaView,
    assert_no_tensors,
)
from dspark.scheduler.budget import ReplicaCurve, ReplicaDemand, ReplicaPlan, allocate

__all__ = [
    "SchedulerConfig",
    "SchedulerCore",
    "SchedulerActor",
    "SchedulerUnavailable",
    "RaySchedulerTransport",
    "get_or_create_scheduler",
]


class SchedulerConfig(StrictModel):
    """Settings of the central scheduler actor."""

    name: str = Field("dspark-scheduler", min_length=1, description="Ray actor name replicas look up.")
    namespace: str = Field("dspark", min_length=1, description="Ray namespace of the actor.")
    detached: bool = Field(False, description="Outlive the driver that created it (lifetime='detached').")
    max_restarts: int = Field(
        -1, ge=-1, description="Ray restarts after a crash (-1 = always). A restarted actor starts "
        "empty and replicas re-register on their next heartbeat."
    )
    stale_after_s: float = Field(
        10.0, gt=0, description="A replica silent this long (scheduler's clock) is dropped from the view."
    )
    lease_s: float = Field(
        5.0, gt=0, description="How long a replica may apply a budget without a newer reply; then it "
        "falls back to its local default."
    )
    prior_accept_rate: float = Field(
        0.6, ge=0, le=1, description="Acceptance α assumed for a replica that has not reported one yet."
    )
    cluster_max_tokens: int | None = Field(
        None, ge=0, description="Optional cap on the verify budgets summed over all replicas (None = no cap)."
    )


@dataclass
class _Replica:
    info: ReplicaInfo
    last_seen: float  # scheduler clock of its last message
    heartbeat: Heartbeat | None = None
    curve: ReplicaCurve | None = None  # G(b) from the latest heartbeat
    plan: ReplicaPlan | None = None


class SchedulerCore:
    """All of the scheduler's logic, no Ray. Not thread-safe: the actor runs one call at a time."""

    def __init__(self, config: SchedulerConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 epoch: str | None = None):
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.epoch = epoch or uuid.uuid4().hex[:12]
        self.version = 0  # bumped whenever membership or any budget changes
        self._replicas: dict[str, _Replica] = {}

    # ------------------------------------------------------------------ protocol
    def register(self, info: ReplicaInfo) -> BudgetReply:
        if not isinstance(info, ReplicaInfo):
            raise TypeError(f"register expects a ReplicaInfo, got {type(info).__name__}")
        assert_no_tensors(info)
        if info.schema_version != SCHEMA_VERSION:
            raise ValueError(f"replica {info.replica_id!r} speaks schema {info.schema_version}, "
                             f"this scheduler {SCHEMA_VERSION}: upgrade one of them")
        self._prune()
        self._replicas[info.replica_id] = _Replica(info, self.clock())
        self.version += 1  # planned at its first heartbeat: until then it has no budget
        return self._reply(info.replica_id)

    def heartbeat(self, hb: Heartbeat) -> BudgetReply:
        if not isinstance(hb, Heartbeat):
            raise TypeError(f"heartbeat expects a Heartbeat, got {type(hb).__name__}")
        assert_no_tensors(hb)
        self._prune()
        rep = self._replicas.get(hb.replica_id)
        if rep is None:
            return BudgetReply(hb.replica_id, False, None, self.version, 0.0, self.epoch)
        rep.last_seen = self.clock()
        if rep.heartbeat is None or hb.seq > rep.heartbeat.seq:  # older or repeated: keep the newer state
            rep.heartbeat = hb
            rep.curve = ReplicaCurve.of(self._demand(rep))
            self._replan(only=None if self.config.cluster_max_tokens is not None else hb.replica_id)
        return self._reply(hb.replica_id)

    def deregister(self, replica_id: str) -> bool:
        gone = self._replicas.pop(replica_id, None) is not None
        if gone:
            self.version += 1
            if self.config.cluster_max_tokens is not None:
                self._replan()  # its share of the cap is free again
        return gone

    def cluster_view(self) -> ClusterView:
        self._prune()
        now = self.clock()
        views = []
        for rid, rep in sorted(self._replicas.items()):
            hb, plan = rep.heartbeat, rep.plan
            views.append(ReplicaView(
                replica_id=rid,
                node=rep.info.node,
                sps_id=rep.info.sps_id,
                load=hb.load if hb else None,
                running=hb.running if hb else 0,
                queue_depth=hb.queue_depth if hb else 0,
                accept_rate=hb.accept_rate if hb else None,
                budget_tokens=plan.budget_tokens if plan else None,
                goodput=plan.goodput if plan else 0.0,
                age_s=now - rep.last_seen,
            ))
        return ClusterView(self.version, self.epoch, tuple(views), sum(v.goodput for v in views))

    # ------------------------------------------------------------------ internals
    def _prune(self) -> None:
        """Drop replicas silent for longer than ``stale_after_s``; with a cluster cap the others
        are re-planned, since the cap's share held by the dropped ones is free again."""
        limit = self.clock() - self.config.stale_after_s
        stale = [rid for rid, rep in self._replicas.items() if rep.last_seen < limit]
        for rid in stale:
            del self._replicas[rid]
        if stale:
            self.version += 1
            if self.config.cluster_max_tokens is not None:
                self._replan()

    def _demand(self, rep: _Replica) -> ReplicaDemand:
        hb, info = rep.heartbeat, rep.info
        assert hb is not None
        alpha = hb.accept_rate if hb.accept_rate is not None else self.config.prior_accept_rate
        return ReplicaDemand(info.replica_id, info.sps_table, info.gamma, info.max_batch_size,
                             hb.running, hb.queue_depth, hb.load, alpha, info.draft_table)

    def _replan(self, only: str | None = None) -> None:
        """Recompute budgets: of one replica (without a cluster cap the objective is separable,
        so the others' budgets cannot change), or of every replica that has sent a heartbeat
        (from their cached curves: a heartbeat recomputes only its sender's)."""
        targets = [self._replicas[only]] if only is not None else list(self._replicas.values())
        targets = [rep for rep in targets if rep.curve is not None]
        plans = allocate([rep.curve for rep in targets], cluster_cap=self.config.cluster_max_tokens)
        changed = False
        for rep in targets:
            new = plans[rep.info.replica_id]
            changed |= rep.plan is None or rep.plan.budget_tokens != new.budget_tokens
            rep.plan = new
        if changed:
            self.version += 1

    def _reply(self, replica_id: str) -> BudgetReply:
        plan = self._replicas[replica_id].plan
        return BudgetReply(replica_id, True, plan.budget_tokens if plan else None, self.version,
                           self.config.lease_s, self.epoch)


# ---------------------------------------------------------------------------------------------
# Ray edge
# ---------------------------------------------------------------------------------------------


class SchedulerActor:
    """Ray shim over :class:`SchedulerCore`; each method delegates. Made remote only by
    :func:`get_or_create_scheduler` (subclasses can be injected there, e.g. by tests)."""

    def __init__(self, config: dict[str, Any] | None = None):
        from dspark.platform.observability.recorders import SchedulerMetrics

        self.core = SchedulerCore(SchedulerConfig(**(config or {})))
        self.metrics = SchedulerMetrics()  # budgets per replica as Ray metrics, at most once a second

    def register(self, info: ReplicaInfo) -> BudgetReply:
        return self.core.register(info)

    def heartbeat(self, hb: Heartbeat) -> BudgetReply:
        reply = self.core.heartbeat(hb)
        self.metrics.maybe_publish(self.core.cluster_view)
        return reply

    def deregister(self, replica_id: str) -> bool:
        gone = self.core.deregister(replica_id)
        self.metrics.maybe_publish(self.core.cluster_view)
        return gone

    def cluster_view(self) -> ClusterView:
        return self.core.cluster_view()


def get_or_create_scheduler(name: str | None = None, namespace: str | None = None, *,
                            config: SchedulerConfig | None = None, detached: bool | None = None,
                            actor_cls: type = SchedulerActor):
    """The scheduler actor named ``name`` in ``namespace``: the running one if it exists (its
    settings are then whatever it was created with), else a new one. Arguments override
    ``config``. Needs ``ray.init`` first. Takes no CPU slot (``num_cpus=0``) and runs one call at
    a time, which is what makes ``SchedulerCore`` safe without locks."""
    import ray

    cfg = config or SchedulerConfig()
    update = {k: v for k, v in dict(name=name, namespace=namespace, detached=detached).items() if v is not None}
    cfg = SchedulerConfig(**{**cfg.model_dump(), **update})
    opts: dict[str, Any] = dict(name=cfg.name, namespace=cfg.namespace, get_if_exists=True, num_cpus=0,
                                max_concurrency=1, max_restarts=cfg.max_restarts)
    if cfg.detached:
        opts["lifetime"] = "detached"
    return ray.remote(actor_cls).options(**opts).remote(cfg.model_dump())


class SchedulerUnavailable(RuntimeError):
    """The scheduler could not answer in time (missing, dead, restarting, or slow)."""


class RaySchedulerTransport:
    """A replica's way to the scheduler actor, looked up by name on first use and again after
    it died, so a scheduler restarted under the same name is found without any setup.

    Every call waits at most ``timeout_s``; a call that timed out is remembered, and no new call
    is sent until it has finished, so a slow actor never accumulates a queue of heartbeats from
    one replica. Failures raise :class:`SchedulerUnavailable` (application errors raised by the
    actor itself propagate as Ray's ``RayTaskError``).
    """

    def __init__(self, name: str = "dspark-scheduler", namespace: str = "dspark"):
        self.name, self.namespace = name, namespace
        self._handle = None
        self._pending = None  # ObjectRef of a call that timed out and may still be running

    def register(self, info: ReplicaInfo, timeout_s: float) -> BudgetReply:
        return self._call("register", info, timeout_s)

    def heartbeat(self, hb: Heartbeat, timeout_s: float) -> BudgetReply:
        return self._call("heartbeat", hb, timeout_s)

    def deregister(self, replica_id: str, timeout_s: float) -> bool:
        return self._call("deregister", replica_id, timeout_s)

    def _call(self, method: str, arg: Any, timeout_s: float) -> Any:
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                raise SchedulerUnavailable(f"scheduler {self.name!r} is still busy with an earlier call")
            self._pending = None
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError as e:  # no actor of that name (yet)
                raise SchedulerUnavailable(f"no scheduler actor {self.name!r} in namespace {self.namespace!r}") from e
        ref = getattr(self._handle, method).remote(arg)
        try:
            return ray.get(ref, timeout=timeout_s)
        except GetTimeoutError as e:
            self._pending = ref
            raise SchedulerUnavailable(f"scheduler {self.name!r} did not answer {method} within {timeout_s:.3g} s") from e
        except ActorUnavailableError as e:  # restarting: the handle stays valid
            raise SchedulerUnavailable(f"scheduler {self.name!r} is unavailable: {e}") from e
        except RayActorError as e:  # dead: look the name up again next time
            self._handle = None
            raise SchedulerUnavailable(f"scheduler {self.name!r} died: {type(e).__name__}") from e
