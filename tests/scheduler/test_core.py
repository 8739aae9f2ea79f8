"""SchedulerCore without Ray: registration, heartbeats and budgets, staleness, ordering, versions,
and what it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dspark.platform.contracts import SCHEMA_VERSION, Heartbeat, ReplicaInfo
from dspark.scheduler.actor import SchedulerConfig, SchedulerCore

KNEE = [(b, 100.0 if b <= 64 else 100.0 * 64 / b) for b in range(1, 513)]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def info(rid: str, table=KNEE, **kw) -> ReplicaInfo:
    return ReplicaInfo(rid, "node-0", kw.pop("max_batch_size", 64), kw.pop("gamma", 7), table, **kw)


def hb(rid: str, seq: int, *, load=0.5, running=8, queue=0, alpha=0.8) -> Heartbeat:
    return Heartbeat(rid, seq, 0.0, load, "busy", queue, running, alpha, 1 + alpha)


@pytest.fixture
def core():
    clock = Clock()
    c = SchedulerCore(SchedulerConfig(stale_after_s=5.0, lease_s=2.0), clock=clock, epoch="e1")
    c.clock_ = clock
    return c


def test_register_then_heartbeat_gets_a_budget(core):
    r = core.register(info("a"))
    assert r.registered and r.budget_tokens is None and r.epoch == "e1"  # no budget before the first heartbeat
    r = core.heartbeat(hb("a", 1, running=32, load=1.0))
    assert r.registered and r.budget_tokens == 32 and r.valid_s == 2.0  # fills the flat region to B = 64
    view = core.cluster_view()
    assert [v.replica_id for v in view.replicas] == ["a"]
    assert view.replicas[0].budget_tokens == 32 and view.replicas[0].goodput > 0
    assert view.goodput == pytest.approx(view.replicas[0].goodput)


def test_idle_replica_gets_more_than_busy_one(core):
    core.register(info("idle"))
    core.register(info("busy"))
    idle = core.heartbeat(hb("idle", 1, load=0.1, running=32))
    busy = core.heartbeat(hb("busy", 1, load=0.95, running=32))
    assert idle.budget_tokens > busy.budget_tokens


def test_unknown_replica_is_told_to_register(core):
    r = core.heartbeat(hb("ghost", 1))
    assert not r.registered and r.budget_tokens is None
    assert core.cluster_view().replicas == ()


def test_old_or_repeated_heartbeats_do_not_overwrite_newer_state(core):
    core.register(info("a"))
    new = core.heartbeat(hb("a", 5, load=1.0, running=32))
    late = core.heartbeat(hb("a", 4, load=0.01, running=1))  # delivered late
    assert late.budget_tokens == new.budget_tokens
    assert core.cluster_view().replicas[0].running == 32


def test_stale_replicas_drop_out_and_must_register_again(core):
    core.register(info("a"))
    core.register(info("b"))
    core.heartbeat(hb("a", 1))
    core.heartbeat(hb("b", 1))
    core.clock_.t += 3.0
    core.heartbeat(hb("a", 2))  # a stays fresh, b falls silent
    core.clock_.t += 3.0
    assert [v.replica_id for v in core.cluster_view().replicas] == ["a"]
    r = core.heartbeat(hb("b", 2))
    assert not r.registered
    core.register(info("b"))
    assert core.heartbeat(hb("b", 3)).budget_tokens is not None


def test_deregister_and_versions(core):
    v0 = core.version
    core.register(info("a"))
    assert core.version > v0
    v1 = core.version
    core.heartbeat(hb("a", 1, running=8))
    v2 = core.version
    assert v2 > v1  # a budget appeared
    core.heartbeat(hb("a", 2, running=8))
    assert core.version == v2  # same state, same budget: same view
    core.heartbeat(hb("a", 3, running=64, load=1.0))
    assert core.version > v2  # the budget changed
    assert core.deregister("a") and not core.deregister("a")
    assert core.cluster_view().replicas == ()


def test_missing_acceptance_uses_the_prior():
    c = SchedulerCore(SchedulerConfig(prior_accept_rate=0.0), clock=Clock())
    c.register(info("a"))
    assert c.heartbeat(Heartbeat("a", 1, 0.0, 1.0, "busy", 0, 8)).budget_tokens == 0  # α = 0: drafts are worthless
    c = SchedulerCore(SchedulerConfig(prior_accept_rate=0.9), clock=Clock())
    c.register(info("a"))
    assert c.heartbeat(Heartbeat("a", 1, 0.0, 1.0, "busy", 0, 8)).budget_tokens == 56


def test_cluster_cap_binds_across_replicas():
    c = SchedulerCore(SchedulerConfig(cluster_max_tokens=40), clock=Clock())
    for rid in ("a", "b"):
        c.register(info(rid))
    c.heartbeat(hb("a", 1, running=8, load=1.0, alpha=0.9))
    c.heartbeat(hb("b", 1, running=8, load=1.0, alpha=0.9))
    budgets = {v.replica_id: v.budget_tokens for v in c.cluster_view().replicas}
    assert sum(budgets.values()) <= 40 and min(budgets.values()) > 0
    # b leaves: its share is free again for a at a's next heartbeat
    c.deregister("b")
    assert c.heartbeat(hb("a", 2, running=8, load=1.0, alpha=0.9)).budget_tokens == 40


def test_refuses_wrong_types_tensors_and_other_schema_versions(core):
    with pytest.raises(TypeError):
        core.register({"replica_id": "a"})
    with pytest.raises(TypeError):
        core.heartbeat("a")
    with pytest.raises(ValueError, match="schema"):
        core.register(info("a", schema_version=SCHEMA_VERSION + 1))
    core.register(info("a"))
    sneaky = dataclasses.replace(hb("a", 1))
    object.__setattr__(sneaky, "accept_rate", np.float64(0.5))  # numpy scalars are tensor-like
    with pytest.raises(TypeError, match="tensor"):
        core.heartbeat(sneaky)


def test_message_validation():
    with pytest.raises(ValueError, match="load"):
        Heartbeat("a", 1, 0.0, 1.5, "busy", 0, 0)
    with pytest.raises(ValueError, match="load_source"):
        Heartbeat("a", 1, 0.0, 0.5, "gpu", 0, 0)
    with pytest.raises(ValueError, match="accept_rate"):
        Heartbeat("a", 1, 0.0, 0.5, "busy", 0, 0, accept_rate=1.2)
    with pytest.raises(ValueError, match="increasing"):
        ReplicaInfo("a", "n", 4, 7, [(8, 1.0), (4, 2.0)])
    i = ReplicaInfo("a", "n", 4, 7, np.array([[1, 10.0], [8, 5.0]]).tolist())
    assert i.sps_table == ((1, 10.0), (8, 5.0)) and i.sps_id.startswith("sps-")
    assert ReplicaInfo("a", "n", 4, 7, [(1, 10.0), (8, 6.0)]).sps_id != i.sps_id  # a new profile, a new identity
