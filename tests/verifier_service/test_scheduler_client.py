"""The replica's scheduler client without Ray: load and acceptance meters, the exchange, and what
happens when the scheduler is gone, slow or restarted (a SchedulerCore behind a fake transport)."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from dspark.platform.contracts import ReplicaInfo
from dspark.scheduler.actor import SchedulerConfig, SchedulerCore
from dspark.scheduler.sps import SPSProfile
from dspark.verifier_service.engine import EngineTimings, StepRecord
from dspark.verifier_service.scheduler_client import (
    AcceptanceMeter,
    LoadMeter,
    ReplicaSnapshot,
    SchedulerClient,
    SchedulerClientConfig,
    engine_probe,
    nvml_utilization,
    replica_info,
)

KNEE = [(b, 100.0 if b <= 64 else 100.0 * 64 / b) for b in range(1, 513)]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class CoreTransport:
    """Direct calls into a SchedulerCore, with switches for the failures under test. Calls hold
    ``lock``: the core runs one call at a time by contract (the Ray actor serialises them)."""

    def __init__(self, core: SchedulerCore):
        self.core = core
        self.down = False
        self.timeouts: list[float] = []
        self.lock = threading.Lock()

    def _check(self, timeout_s: float) -> None:
        self.timeouts.append(timeout_s)
        if self.down:
            raise ConnectionError("scheduler gone")

    def register(self, info, timeout_s):
        self._check(timeout_s)
        with self.lock:
            return self.core.register(info)

    def heartbeat(self, hb, timeout_s):
        self._check(timeout_s)
        with self.lock:
            return self.core.heartbeat(hb)

    def deregister(self, replica_id, timeout_s):
        self._check(timeout_s)
        with self.lock:
            return self.core.deregister(replica_id)


def make_client(clock, transport, *, running=32, busy=None, **cfg):
    busy = busy if busy is not None else [0.0]
    info = ReplicaInfo("rep-0", "node-0", 64, 7, KNEE)
    config = SchedulerClientConfig(**{"interval_s": 1.0, "timeout_s": 0.5, "default_budget_tokens": 3, "use_nvml": False, **cfg})
    return SchedulerClient(info, transport, config, probe=lambda: ReplicaSnapshot(running, 0, busy[0]), clock=clock)


# ------------------------------------------------------------------------------------ meters


def test_busy_fraction_over_a_sliding_window():
    clock = Clock()
    m = LoadMeter(window_s=2.0, clock=clock)
    assert m.source == "busy" and m.sample(0.0) == 0.0  # no history yet
    clock.t += 1.0
    assert m.sample(0.5) == pytest.approx(0.5)
    clock.t += 1.0
    assert m.sample(1.5) == pytest.approx(0.75)  # 1.5 busy s over 2 s
    clock.t += 1.0
    assert m.sample(1.5) == pytest.approx(0.5)  # the first second left the window: 1.0 over the last 2 s
    clock.t += 2.0
    assert m.sample(1.5) == 0.0  # idle for a whole window
    clock.t += 1.0
    assert m.sample(0.2) == 0.0  # the counter restarted (a new engine): no negative load


def test_gpu_reader_is_averaged_and_dropped_when_it_fails():
    clock = Clock()
    readings = iter([0.2, 0.6])

    def gpu():
        try:
            return next(readings)
        except StopIteration:
            raise RuntimeError("NVML went away") from None

    m = LoadMeter(window_s=5.0, gpu=gpu, clock=clock)
    assert m.source == "nvml" and m.sample(0.0) == pytest.approx(0.2)
    clock.t += 1.0
    assert m.sample(0.9) == pytest.approx(0.4)
    clock.t += 1.0
    assert m.sample(1.0) == pytest.approx(0.5)  # reader failed: busy fraction, 1.0 s over 2 s
    assert m.source == "busy"


def test_nvml_reader_maps_cuda_visible_devices(monkeypatch):
    calls = []
    util = types.SimpleNamespace(gpu=37)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or f"h{i}",
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or u,
        nvmlDeviceGetUtilizationRates=lambda h: util,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert nvml_utilization(0)() == pytest.approx(0.37) and calls[-1] == ("index", 3)
    assert nvml_utilization(1)() == pytest.approx(0.37) and calls[-1] == ("uuid", "GPU-abc")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    nvml_utilization(2)
    assert calls[-1] == ("index", 2)

    def unsupported(h):
        raise RuntimeError("not supported on MIG")

    monkeypatch.setattr(fake, "nvmlDeviceGetUtilizationRates", unsupported)
    assert nvml_utilization(0) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert nvml_utilization(0) is None


def record(lengths, accepted, fallback=False):
    return StepRecord(tuple(f"q{i}" for i in range(len(lengths))), tuple(lengths), tuple(accepted), None, fallback)


def test_acceptance_meter_estimates_conditional_acceptance_and_tau():
    clock = Clock()
    m = AcceptanceMeter(window_s=10.0, clock=clock)
    assert m.summary() == (None, None)
    # row 0: 4 verified, 2 accepted -> 2 successes, 1 failure; row 1: 3 of 3 -> 3 successes;
    # row 2: plain decoding (ℓ = 0) -> no trial, but it emitted one token
    m.observe(record([4, 3, 0], [2, 3, 0]))
    alpha, tau = m.summary()
    assert alpha == pytest.approx(5 / 6) and tau == pytest.approx((3 + 4 + 1) / 3)
    clock.t += 11.0
    m.observe(record([2], [0], fallback=False))
    assert m.summary() == (0.0, 1.0)  # the first step left the window


def test_replica_info_from_a_profile():
    prof = SPSProfile.from_points([(1, 100.0), (64, 90.0)], target="demo", device="cpu", dtype="float32", config_hash="abc")
    info = replica_info("rep-0", prof, max_batch_size=8, gamma=5, node="n1")
    assert info.sps_table == ((1, 100.0), (64, 90.0)) and info.node == "n1" and info.gamma == 5
    assert info.sps_id.startswith("demo/cpu/float32/abc:sps-")
    again = replica_info("rep-0", SPSProfile.from_points([(1, 100.0), (64, 80.0)], target="demo", device="cpu",
                                                        dtype="float32", config_hash="abc"), max_batch_size=8, gamma=5)
    assert again.sps_id != info.sps_id  # re-measured: a new identity


def test_engine_probe_reads_the_engine_counters():
    eng = types.SimpleNamespace(num_running=3, waiting=[1, 2], timings=EngineTimings(prefill_s=1.0, draft_s=0.5, verify_s=2.0))
    assert engine_probe(eng)() == ReplicaSnapshot(3, 2, 3.5)


# ------------------------------------------------------------------------------------ client


def test_client_registers_and_applies_its_budget():
    clock = Clock()
    core = SchedulerCore(SchedulerConfig(lease_s=2.0), clock=clock, epoch="e1")
    c = make_client(clock, CoreTransport(core))
    assert c.current_budget() == 3  # local default before any reply
    assert c.tick()
    s = c.status()
    assert s.registered and s.registrations == 1 and s.epoch == "e1" and s.budget_from_scheduler
    # a fresh replica has no load history (load 0): idle, so it may verify its whole batch
    assert c.current_budget() == core.cluster_view().replicas[0].budget_tokens == 32 * 7


def test_scheduler_gone_keeps_the_budget_for_its_lease_then_the_default():
    clock = Clock()
    t = CoreTransport(SchedulerCore(SchedulerConfig(lease_s=2.0), clock=clock))
    c = make_client(clock, t)
    c.tick()
    t.down = True
    clock.t += 1.0
    assert not c.tick() and c.current_budget() == 32 * 7  # within the lease
    clock.t += 1.5
    assert not c.tick() and c.current_budget() == 3  # lease over: the local default
    s = c.status()
    assert s.failures == 2 and "scheduler gone" in s.last_error and not s.budget_from_scheduler
    c2 = make_client(clock, t, default_budget_tokens=None)
    assert c2.current_budget() is None  # no default: no cap


def test_restarted_scheduler_gets_a_fresh_registration():
    clock = Clock()
    t = CoreTransport(SchedulerCore(SchedulerConfig(), clock=clock, epoch="old"))
    c = make_client(clock, t)
    c.tick()
    t.core = SchedulerCore(SchedulerConfig(), clock=clock, epoch="new")  # restarted: empty state
    assert c.tick()
    s = c.status()
    assert s.registrations == 2 and s.epoch == "new" and c.current_budget() == 32 * 7
    assert [v.replica_id for v in t.core.cluster_view().replicas] == ["rep-0"]


def test_every_call_of_an_exchange_shares_one_deadline():
    clock = Clock()

    class Slow(CoreTransport):
        def register(self, info, timeout_s):
            clock.t += 0.3  # the registration eats most of the budget
            return super().register(info, timeout_s)

    t = Slow(SchedulerCore(SchedulerConfig(), clock=clock))
    c = make_client(clock, t, timeout_s=0.5)
    assert c.tick()
    assert t.timeouts[0] == pytest.approx(0.5) and t.timeouts[1] == pytest.approx(0.2)
    t.timeouts.clear()
    clock.t += 1.0
    c._registered = False  # force a registration that uses up the whole deadline
    t.register = lambda info, timeout_s: (setattr(clock, "t", clock.t + 0.6), CoreTransport.register(t, info, timeout_s))[1]
    assert not c.tick() and "ran out of time" in c.status().last_error
    assert all(x <= 0.5 for x in t.timeouts)


def test_nothing_the_probe_or_records_do_escapes():
    clock = Clock()
    t = CoreTransport(SchedulerCore(SchedulerConfig(), clock=clock))
    c = make_client(clock, t)

    def broken():
        raise RuntimeError("engine torn down")

    c.probe = broken
    assert not c.tick() and "torn down" in c.status().last_error
    c.observe_step(object())  # not a StepRecord: ignored


def test_background_thread_heartbeats_and_deregisters_on_stop():
    t = CoreTransport(SchedulerCore(SchedulerConfig()))
    info = ReplicaInfo("rep-t", "node-0", 64, 7, KNEE)
    cfg = SchedulerClientConfig(interval_s=0.05, timeout_s=0.05, use_nvml=False)
    c = SchedulerClient(info, t, cfg, probe=lambda: ReplicaSnapshot(4, 0, 0.0)).start()
    deadline = time.monotonic() + 5.0
    while c.status().exchanges < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.status().exchanges >= 3 and c.current_budget() is not None
    with t.lock:
        assert [v.replica_id for v in t.core.cluster_view().replicas] == ["rep-t"]
    c.stop()
    assert t.core.cluster_view().replicas == ()  # deregistered
    n = c.status().exchanges
    time.sleep(0.15)
    assert c.status().exchanges == n  # the thread is gone


def test_config_is_strict():
    with pytest.raises(ValueError, match="interval_s"):
        SchedulerClientConfig(interval_s=0.1, timeout_s=0.5)
    with pytest.raises(ValueError):
        SchedulerClientConfig(heartbeat_every=1.0)
    with pytest.raises(ValueError):
        SchedulerConfig(stale_after_s=0)


def test_wired_to_a_real_engine(tiny_checkpoints):
    """The wiring of scheduler/DESIGN.md on a tiny target: the engine's counters and step records
    reach the heartbeat, and the scheduler's budget caps what the engine verifies."""
    from _helpers import prompts
    from _mocks import MockDrafter
    from dspark.platform.config import TargetConfig
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.platform.target.loading import load_target
    from dspark.scheduler.policies import FixedPolicy
    from dspark.verifier_service.engine import VerifierEngine

    target = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    engine = VerifierEngine(target, MockDrafter(target.vocab_size, 4, oracle=target, corrupt=0.3), FixedPolicy(),
                            max_batch_size=3, prefill_chunk=8)
    sent = []

    class Recording(CoreTransport):
        def heartbeat(self, hb, timeout_s):
            sent.append(hb)
            return super().heartbeat(hb, timeout_s)

    transport = Recording(SchedulerCore(SchedulerConfig(cluster_max_tokens=2)))  # a cap small enough to bind
    info = ReplicaInfo("rep-e", "node-0", 3, engine.gamma, KNEE)
    client = SchedulerClient(info, transport, SchedulerClientConfig(use_nvml=False), probe=engine_probe(engine))
    records = []
    engine.add_observer(records.append)
    engine.add_observer(client.observe_step)
    for i, p in enumerate(prompts(target.vocab_size, [5, 9, 3, 7, 4], seed=1)):
        engine.add_request(GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=12, ignore_eos=True)))

    assert client.tick()  # before any step: all five wait for the three slots
    assert sent[-1].queue_depth == 5 and sent[-1].running == 0 and sent[-1].accept_rate is None
    steps = 0
    while engine.has_unfinished():
        engine.verify_budget = client.current_budget()
        engine.step()
        steps += 1
        if steps == 3:
            assert client.tick()
            hb = sent[-1]
            assert hb.running == 3 and hb.queue_depth == 2
            assert hb.load > 0 and hb.load_source == "busy"
    assert client.current_budget() == 2
    assert records and all(sum(r.lengths) <= 2 for r in records)  # the cap reached the policy
    assert any(sum(r.lengths) == 2 for r in records)
    assert client.tick()
    rows = [(l, a) for r in records for l, a in zip(r.lengths, r.accepted)]
    trials = sum(a + (a < l) for l, a in rows if l > 0)
    alpha = sum(a for l, a in rows if l > 0) / trials
    assert sent[-1].accept_rate == pytest.approx(alpha) and 0 < alpha < 1  # the mock drafter errs 30% of the time
    assert sent[-1].tau == pytest.approx(1 + sum(a for _, a in rows) / len(rows))
