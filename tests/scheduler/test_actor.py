"""The scheduler protocol with real Ray actors: replica clients (in this process, on their own
threads) register and heartbeat; budgets follow load; the actor is killed, stalled and
restarted under the same name; silent replicas drop out."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from dspark.platform.contracts import ReplicaInfo
from dspark.scheduler.actor import RaySchedulerTransport, SchedulerActor, SchedulerConfig, get_or_create_scheduler
from dspark.verifier_service.scheduler_client import ReplicaSnapshot, SchedulerClient, SchedulerClientConfig

pytestmark = pytest.mark.ray

KNEE = [(b, 100.0 if b <= 64 else 100.0 * 64 / b) for b in range(1, 513)]
NAMESPACE = "dspark-test"
TIMEOUT_S = 0.3
SLACK_S = 0.5  # scheduling noise on a shared 2-core machine


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def name(ray_session):
    return f"sched-{uuid.uuid4().hex[:8]}"


def make_client(name: str, rid: str, *, load: float, running: int, default=5, interval_s=0.3) -> SchedulerClient:
    """A replica whose step loop is busy ``load`` of the time with ``running`` requests."""
    t0 = time.monotonic()
    cfg = SchedulerClientConfig(name=name, namespace=NAMESPACE, interval_s=interval_s, timeout_s=TIMEOUT_S,
                                default_budget_tokens=default, load_window_s=2.0, use_nvml=False)
    info = ReplicaInfo(rid, "node-0", 64, 7, KNEE)
    probe = lambda: ReplicaSnapshot(running, 0, load * (time.monotonic() - t0))  # noqa: E731
    return SchedulerClient(info, RaySchedulerTransport(name, NAMESPACE), cfg, probe=probe)


def wait_for(cond, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def view(ray, handle):
    return {v.replica_id: v for v in ray.get(handle.cluster_view.remote(), timeout=10).replicas}


def test_idle_replica_gets_a_larger_budget_than_a_busy_one(ray_session, name):
    ray = ray_session
    handle = get_or_create_scheduler(name, NAMESPACE, config=SchedulerConfig(lease_s=2.0))
    clients = {
        "idle": make_client(name, "idle", load=0.1, running=32),
        "busy": make_client(name, "busy", load=0.95, running=32),
        "small": make_client(name, "small", load=0.5, running=2),
    }
    try:
        for c in clients.values():
            c.start()
        # a load needs two samples: after three answered heartbeats every budget reflects it
        wait_for(lambda: all(c.status().exchanges >= 3 for c in clients.values()), what="settled budgets")
        v = view(ray, handle)
        assert set(v) == set(clients) and v["idle"].load < 0.3 and v["busy"].load > 0.8
        b = {rid: c.current_budget() for rid, c in clients.items()}
        assert b == {rid: x.budget_tokens for rid, x in v.items()}  # what the scheduler planned
        assert b["idle"] > b["busy"] > 0
        assert b["small"] == 2 * 7  # two requests on the flat part: verify everything
        again = get_or_create_scheduler(name, NAMESPACE)
        assert ray.get(again.cluster_view.remote()).epoch == ray.get(handle.cluster_view.remote()).epoch  # the same actor
    finally:
        for c in clients.values():
            c.stop()
    assert view(ray, handle) == {}  # all deregistered


def test_killed_scheduler_keeps_budgets_then_default_then_reregisters(ray_session, name):
    ray = ray_session
    handle = get_or_create_scheduler(name, NAMESPACE, config=SchedulerConfig(lease_s=2.0))
    a = make_client(name, "a", load=0.2, running=8)
    b = make_client(name, "b", load=0.9, running=48)
    try:
        a.start(), b.start()
        # three answered heartbeats each: the loads (two samples) have reached the budgets
        wait_for(lambda: a.status().exchanges >= 3 and b.status().exchanges >= 3, what="budgets")
        epoch = a.status().epoch
        registrations = {c: c.status().registrations for c in (a, b)}
        ray.kill(handle)
        time.sleep(0.1)  # a reply that was already on its way lands
        before = {"a": a.current_budget(), "b": b.current_budget()}
        assert a.status().budget_from_scheduler and b.status().budget_from_scheduler

        # the step loop's side never waits: budgets stay, and each read is immediate
        t_end = time.monotonic() + 0.8
        while time.monotonic() < t_end:
            t = time.perf_counter()
            assert {"a": a.current_budget(), "b": b.current_budget()} == before
            assert time.perf_counter() - t < 0.01
            time.sleep(0.02)
        wait_for(lambda: a.status().failures > 0 and b.status().failures > 0, what="failed heartbeats")
        for c in (a, b):
            assert c.status().max_exchange_s < TIMEOUT_S + SLACK_S, c.status()

        # lease over: the local default
        wait_for(lambda: a.current_budget() == 5 and b.current_budget() == 5, timeout_s=5.0, what="local default")
        assert not a.status().budget_from_scheduler

        # a new scheduler under the same name: both find it, register again, get fresh budgets
        handle = get_or_create_scheduler(name, NAMESPACE, config=SchedulerConfig(lease_s=2.0))
        wait_for(lambda: a.status().budget_from_scheduler and b.status().budget_from_scheduler, what="re-registration")
        for c in (a, b):
            s = c.status()
            assert s.registrations == registrations[c] + 1 and s.epoch != epoch and s.last_error is None
        assert set(view(ray, handle)) == {"a", "b"}
        assert a.current_budget() > b.current_budget()
    finally:
        a.stop(), b.stop()


def test_crashed_scheduler_is_restarted_by_ray_and_replicas_register_again(ray_session, name):
    ray = ray_session
    handle = get_or_create_scheduler(name, NAMESPACE)  # max_restarts=-1 by default
    c = make_client(name, "a", load=0.5, running=8)
    try:
        c.start()
        wait_for(lambda: c.status().exchanges >= 2, what="a budget")
        epoch, registrations = c.status().epoch, c.status().registrations
        ray.kill(handle, no_restart=False)  # as if its process died: Ray restarts it, empty
        wait_for(lambda: c.status().epoch != epoch and c.status().budget_from_scheduler, what="the restarted actor")
        assert c.status().registrations == registrations + 1
        assert set(view(ray, handle)) == {"a"}  # the old handle reaches the restarted actor
    finally:
        c.stop()


def test_stalled_scheduler_bounds_heartbeats_and_recovers_without_reregistering(ray_session, name):
    ray = ray_session

    class Stalling(SchedulerActor):  # a local class: Ray ships it by value
        def stall(self, seconds: float) -> None:
            time.sleep(seconds)

    handle = get_or_create_scheduler(name, NAMESPACE, config=SchedulerConfig(lease_s=3.0, stale_after_s=10.0),
                                     actor_cls=Stalling)
    c = make_client(name, "a", load=0.5, running=8)
    try:
        c.start()
        wait_for(lambda: c.status().exchanges >= 3, what="a settled budget")
        budget, failures, registrations = c.current_budget(), c.status().failures, c.status().registrations
        stalled = handle.stall.remote(1.5)  # calls queue behind it: the actor runs one at a time
        wait_for(lambda: c.status().failures > failures, what="a timed-out heartbeat")
        assert c.current_budget() == budget  # within the lease
        ray.get(stalled, timeout=10)
        exchanges = c.status().exchanges
        wait_for(lambda: c.status().exchanges > exchanges + 1, what="recovery")
        s = c.status()
        assert s.registrations == registrations and s.last_error is None  # the same actor: no new registration
        assert s.max_exchange_s < TIMEOUT_S + SLACK_S, s
    finally:
        c.stop()


def test_silent_replicas_drop_out_and_come_back(ray_session, name):
    ray = ray_session
    handle = get_or_create_scheduler(name, NAMESPACE, config=SchedulerConfig(stale_after_s=1.0))
    a = make_client(name, "a", load=0.5, running=4)
    b = make_client(name, "b", load=0.5, running=4)
    try:
        a.start(), b.start()
        # both have had an answer (the actor may register a replica whose first reply timed out)
        wait_for(lambda: a.status().budget_from_scheduler and b.status().budget_from_scheduler, what="budgets")
        assert set(view(ray, handle)) == {"a", "b"}
        registrations = b.status().registrations
        b.stop(deregister=False)  # b falls silent (a crashed replica)
        time.sleep(1.3)
        assert set(view(ray, handle)) == {"a"}
        b.start()  # b comes back: told it is unknown, it registers again
        wait_for(lambda: b.status().registrations == registrations + 1, what="b registered again")
        assert set(view(ray, handle)) == {"a", "b"}
    finally:
        a.stop(), b.stop()
