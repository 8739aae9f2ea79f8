"""The metric definitions and the recorders, with a fake metric factory (no Ray): what each
component's events turn into, the tags, and that recording never breaks the caller."""

from __future__ import annotations

import asyncio
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import pytest

from _helpers import MASK_ID
from dspark.platform.observability import metrics as M
from dspark.platform.observability.recorders import (
    IngressMetrics,
    LoopMetrics,
    SchedulerMetrics,
    StepMetrics,
    TrainingMetrics,
    error_kind,
)


class FakeMetric:
    def __init__(self, spec: M.MetricSpec, log: list):
        self.spec, self.log = spec, log

    def _rec(self, op: str, value: float, tags: dict) -> None:
        assert set(tags) == set(self.spec.tag_keys), (self.spec.name, tags)  # Ray requires every key
        assert all(isinstance(v, str) for v in tags.values())
        assert isinstance(value, float)
        self.log.append((self.spec.name, op, value, dict(tags)))

    def inc(self, value=1.0, tags=None):
        assert self.spec.kind == "counter" and value > 0
        self._rec("inc", value, tags)

    def set(self, value, tags=None):
        assert self.spec.kind == "gauge"
        self._rec("set", value, tags)

    def observe(self, value, tags=None):
        assert self.spec.kind == "histogram"
        self._rec("observe", value, tags)


class FakeFactory:
    def __init__(self):
        self.log: list = []
        self.made: list[str] = []

    def make(self, spec):
        self.made.append(spec.name)
        return FakeMetric(spec, self.log)

    def values(self, name, op=None, **tags):
        return [v for n, o, v, t in self.log
                if n == name and (op is None or o == op) and all(t.get(k) == x for k, x in tags.items())]

    def totals(self, name, key):
        out = defaultdict(float)
        for n, _, v, t in self.log:
            if n == name:
                out[t[key]] += v
        return dict(out)


TAGS = {"application": "app", "deployment": "VerifierReplica", "replica": "replica-1"}


@dataclass(frozen=True)
class Rec:  # the fields of verifier_service.engine.StepRecord that StepMetrics reads
    request_ids: tuple
    lengths: tuple
    accepted: tuple
    confidences: object = None
    fallback: bool = False
    draft_s: float | None = 0.002
    verify_s: float | None = 0.005


# ----------------------------------------------------------------------------- definitions
def test_metric_definitions_are_consistent():
    assert len({m.name for m in M.METRICS}) == len(M.METRICS)
    for m in M.METRICS:
        assert re.fullmatch(r"dspark_[a-z0-9_]+", m.name)
        assert m.description and m.where
        if m.kind == "histogram":
            assert all(b > 0 for b in m.boundaries)
        if "application" in m.tag_keys:
            assert m.tag_keys[:3] == M.SERVING_TAGS
    assert M.REQUESTS.exported == "ray_dspark_requests_total"
    assert M.QUEUE_DEPTH.series() == ("ray_dspark_queue_depth",)
    assert M.TIME_TO_FIRST_TOKEN.series() == tuple(f"ray_dspark_time_to_first_token_seconds_{p}"
                                                   for p in ("bucket", "sum", "count"))
    with pytest.raises(AttributeError):
        M.QUEUE_DEPTH.bucket
    with pytest.raises(ValueError):
        M.MetricSpec("dspark_x", "histogram", "d", (), "w", (0.0, 1.0))  # Ray refuses boundaries <= 0
    with pytest.raises(ValueError):
        M.MetricSpec("other_x", "gauge", "d", (), "w")


def test_design_doc_lists_every_metric():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[3] / "platform" / "observability" / "DESIGN.md"
    assert M.markdown_table() in doc.read_text(encoding="utf-8"), \
        "regenerate the table in platform/observability/DESIGN.md from metrics.markdown_table()"


def test_integer_histograms_have_a_bucket_per_value():
    # ℓ and a are integers 0..γ: the half-integer boundaries give each value its own bucket
    assert M.ACCEPTED_LENGTH.boundaries[:3] == (0.5, 1.5, 2.5)
    assert M.VERIFY_LENGTH.boundaries == M.ACCEPTED_LENGTH.boundaries


def test_default_factory_is_null_without_ray(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert isinstance(M.default_factory(), M.NullFactory)
    rec = StepMetrics(TAGS)  # the default factory: records nothing, raises nothing
    rec(Rec(("a",), (2,), (1,)))


# ----------------------------------------------------------------------------- engine steps
def test_step_metrics_per_row_and_per_position():
    f = FakeFactory()
    obs = StepMetrics(TAGS, f)
    obs(Rec(("a", "b", "c"), (3, 2, 0), (1, 2, 0)))
    obs(Rec(("a", "b"), (3, 3), (3, 0), draft_s=None, verify_s=None))
    assert sorted(f.values("dspark_verify_length")) == [0, 2, 3, 3, 3]
    assert sorted(f.values("dspark_accepted_length")) == [0, 1, 2, 3]  # the ℓ = 0 row is not a speculative step
    drafted, accepted = f.totals("dspark_drafted_tokens", "position"), f.totals("dspark_accepted_tokens", "position")
    # step 1: positions 1..3 drafted by a, 1..2 by b; accepted a: 1, b: 1..2. step 2: a 1..3 (all), b 1..3 (none)
    assert drafted == {"1": 4, "2": 4, "3": 3}
    assert accepted == {"1": 3, "2": 2, "3": 1}
    assert f.values("dspark_draft_step_seconds") == [0.002]  # the record without timings adds none
    assert f.values("dspark_verify_step_seconds") == [0.005]
    assert f.values("dspark_fallback_steps") == []
    for _, _, _, tags in f.log:
        assert {k: tags[k] for k in M.SERVING_TAGS} == TAGS
    # one increment per position per step, however many rows
    assert len(f.values("dspark_drafted_tokens", "inc")) == 3 + 3


def test_fallback_counts_a_step_and_a_draft_failure():
    f = FakeFactory()
    StepMetrics(TAGS, f)(Rec(("a", "b"), (0, 0), (0, 0), fallback=True))
    assert f.values("dspark_fallback_steps") == [1.0]
    assert f.values("dspark_request_errors", kind="draft_failure") == [1.0]
    assert f.values("dspark_drafted_tokens") == []  # no zero increments (Ray refuses them)


def test_a_broken_metric_backend_never_fails_the_step(caplog):
    class Broken:
        def make(self, spec):
            raise RuntimeError("backend down")

    obs = StepMetrics(TAGS, Broken())
    obs(Rec(("a",), (1,), (1,)))
    obs(Rec(("a",), (1,), (1,)))
    assert sum("recording failed" in r.message for r in caplog.records) == 1  # logged once


def test_step_metrics_on_a_real_engine_match_its_statistics(tiny_checkpoints):
    """Through VerifierEngine.add_observer: per-position counts equal the requests' own stats."""
    import torch

    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig, TargetConfig
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.platform.target.loading import load_target
    from dspark.verifier_service.engine import VerifierEngine

    target = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])))
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(kind="dspark", block_size=3, num_layers=1), target, mask_token_id=MASK_ID)
    engine = VerifierEngine(target, drafter, max_batch_size=4, max_model_len=64)
    f = FakeFactory()
    engine.add_observer(StepMetrics(TAGS, f))
    reqs = [GenerationRequest(f"r{i}", (1 + i, 2, 3), SamplingParams(max_tokens=10, ignore_eos=True)) for i in range(3)]
    outs = engine.generate(reqs)
    proposed = [sum(o.stats.proposed_at[k] for o in outs.values()) for k in range(3)]
    acc = [sum(o.stats.accepted_at[k] for o in outs.values()) for k in range(3)]
    drafted_m = f.totals("dspark_drafted_tokens", "position")
    accepted_m = f.totals("dspark_accepted_tokens", "position")
    assert [drafted_m.get(str(k + 1), 0) for k in range(3)] == proposed
    assert [accepted_m.get(str(k + 1), 0) for k in range(3)] == acc
    assert len(f.values("dspark_verify_step_seconds")) == engine.timings.steps
    assert all(v >= 0 for v in f.values("dspark_draft_step_seconds"))


# ----------------------------------------------------------------------------- replica loop
class FakeEngine:
    def __init__(self, waiting=0, running=0):
        self.waiting, self.num_running = [None] * waiting, running


@dataclass
class Out:
    new_token_ids: tuple


def test_loop_metrics_tokens_gauges_and_load():
    now = [100.0]
    f = FakeFactory()
    m = LoopMetrics(TAGS, f, window_s=10.0, clock=lambda: now[0])
    m.on_step(FakeEngine(waiting=2, running=3), [Out((1, 2)), Out((3,)), Out(())], busy_s=0.0)
    now[0] += 4.0
    m.on_step(FakeEngine(waiting=0, running=3), [Out((4, 5, 6))], busy_s=2.0)  # busy 2 s of 4
    assert f.values("dspark_generated_tokens") == [3.0, 3.0]
    assert f.values("dspark_queue_depth") == [2.0, 0.0]
    assert f.values("dspark_running_requests") == [3.0, 3.0]
    assert f.values("dspark_replica_load") == [0.0, 0.5]
    now[0] += 16.0  # idle: busy time stops growing, the window slides past the busy part
    m.on_idle(FakeEngine(), busy_s=2.0)
    now[0] += 1.0
    m.on_idle(FakeEngine(), busy_s=2.0)
    assert f.values("dspark_replica_load")[-1] == 0.0
    assert f.values("dspark_running_requests")[-1] == 0.0


def test_replica_loop_calls_its_metrics_after_steps_and_while_idle():
    """The real ReplicaLoop with a stub engine: on_step after every step, on_idle while waiting."""
    from dspark.platform.contracts import GenerationRequest, RequestOutput, RequestStats, SamplingParams
    from dspark.verifier_service.replica import ReplicaLoop

    class Engine:
        def __init__(self):
            self.waiting, self.running = [], []

        @property
        def num_running(self):
            return len(self.running)

        def has_unfinished(self):
            return bool(self.waiting or self.running)

        def add_request(self, req):
            self.running.append([req.request_id, 0])

        def abort(self, rid):
            self.running = [r for r in self.running if r[0] != rid]

        def step(self):
            outs = []
            for r in self.running:
                r[1] += 1
                outs.append(RequestOutput(r[0], (7, 7), (7,) * 2 * r[1], r[1] == 3, "length" if r[1] == 3 else None,
                                          RequestStats()))
            self.running = [r for r in self.running if r[1] < 3]
            return outs

    calls = defaultdict(int)

    class Spy(LoopMetrics):
        def on_step(self, engine, outputs, busy_s):
            calls["step"] += 1
            super().on_step(engine, outputs, busy_s)

        def on_idle(self, engine, busy_s):
            calls["idle"] += 1
            super().on_idle(engine, busy_s)

    f = FakeFactory()
    loop = ReplicaLoop(Engine(), metrics=Spy(TAGS, f, idle_interval_s=0.05)).start()

    async def run():
        return [o async for o in loop.submit(GenerationRequest("q", (1,), SamplingParams(max_tokens=6)))]

    try:
        assert len(asyncio.run(run())) == 3
        import time

        time.sleep(0.3)  # idle: on_idle at least every 0.05 s
    finally:
        loop.stop()
    assert calls["step"] == 3 and calls["idle"] >= 3
    assert sum(f.values("dspark_generated_tokens")) == 6


# ----------------------------------------------------------------------------- ingress
class APIErr(Exception):
    def __init__(self, status, kind="invalid_request_error", code=None):
        self.status, self.kind, self.code = status, kind, code


@pytest.mark.parametrize("exc, kind", [
    (APIErr(400), "invalid_request"), (APIErr(413, code="body_too_large"), "invalid_request"),
    (APIErr(401, "authentication_error", "invalid_api_key"), "authentication"),
    (APIErr(404, code="model_not_found"), "model_not_found"),
    (APIErr(400, code="context_length_exceeded"), "context_length"),
    (APIErr(503, "server_error"), "server_error"), (APIErr(500, "server_error"), "server_error"),
])
def test_error_kinds(exc, kind):
    assert error_kind(exc) == kind and kind in M.ERROR_KINDS


def test_error_kinds_of_the_real_api_errors():
    from dspark.platform.serving import openai_api as oai

    with pytest.raises(oai.APIError) as e:
        oai.parse_body(b"{", oai.CompletionBody, max_bytes=1 << 20)
    assert error_kind(e.value) == "invalid_request"
    assert error_kind(oai.APIError(401, "x", kind="authentication_error", code="invalid_api_key")) == "authentication"


def test_request_timer_ttft_itl_latency():
    now = [10.0]
    f = FakeFactory()
    ing = IngressMetrics({"application": "app", "deployment": "Ingress", "replica": "i1"}, f, clock=lambda: now[0])
    t = ing.request("chat")
    now[0] += 0.25
    t.output(1)  # first token: TTFT
    now[0] += 0.3
    t.output(3)  # 3 tokens after 0.3 s: 0.1 s per token
    now[0] += 0.2
    t.output(0)  # an empty output (final bookkeeping) adds no latency sample
    now[0] += 0.1
    t.output(1)  # measured from the last output that carried tokens: 0.3 s
    t.done()
    t.done()  # once
    assert f.values("dspark_requests", route="chat") == [1.0]
    assert f.values("dspark_time_to_first_token_seconds") == [0.25]
    assert f.values("dspark_inter_token_latency_seconds") == pytest.approx([0.1, 0.3])
    assert f.values("dspark_request_latency_seconds") == pytest.approx([0.85])
    assert f.values("dspark_request_errors") == []


def test_request_timer_error_is_counted_once_and_ends_the_request():
    f = FakeFactory()
    ing = IngressMetrics(TAGS, f)
    t = ing.request("completions")
    t.error(APIErr(404, code="model_not_found"))
    t.error("server_error")
    t.done()
    ing.error(APIErr(401, "authentication_error"))
    assert f.values("dspark_request_errors", kind="model_not_found") == [1.0]
    assert f.values("dspark_request_errors", kind="authentication") == [1.0]
    assert f.values("dspark_request_errors", kind="server_error") == []
    assert f.values("dspark_request_latency_seconds") == []


# ----------------------------------------------------------------------------- scheduler
def test_scheduler_metrics_publish_budgets_and_zero_departed_replicas():
    from dspark.platform.contracts import Heartbeat, ReplicaInfo
    from dspark.scheduler.actor import SchedulerConfig, SchedulerCore

    now = [0.0]
    core = SchedulerCore(SchedulerConfig(), clock=lambda: now[0])
    f = FakeFactory()
    m = SchedulerMetrics(f, min_interval_s=1.0, clock=lambda: now[0])
    table = [(b, 100.0) for b in range(1, 65)]
    for rid in ("r1", "r2"):
        core.register(ReplicaInfo(rid, "n", 8, 4, table))
        core.heartbeat(Heartbeat(rid, 1, 0.0, 0.5, "busy", 0, 4, 0.7, 2.0))
    m.maybe_publish(core.cluster_view)
    budgets = {t["replica"]: v for n, _, v, t in f.log if n == "dspark_scheduler_budget_tokens"}
    assert set(budgets) == {"r1", "r2"} and all(v >= 0 for v in budgets.values())
    assert f.values("dspark_scheduler_replicas") == [2.0]
    calls = []
    m.maybe_publish(lambda: calls.append(1))  # within min_interval_s: the view is not even built
    assert calls == []
    core.deregister("r2")
    now[0] += 1.0
    m.maybe_publish(core.cluster_view)
    assert f.values("dspark_scheduler_budget_tokens", replica="r2")[-1] == 0.0
    assert f.values("dspark_scheduler_goodput", replica="r2")[-1] == 0.0
    assert f.values("dspark_scheduler_replicas")[-1] == 1.0


def test_scheduler_actor_class_publishes_on_heartbeat():
    """SchedulerActor (the Ray shim, used here as a plain object) records through its recorder."""
    from dspark.platform.contracts import Heartbeat, ReplicaInfo
    from dspark.scheduler.actor import SchedulerActor

    actor = SchedulerActor()
    f = FakeFactory()
    actor.metrics = SchedulerMetrics(f)
    actor.register(ReplicaInfo("r1", "n", 8, 4, [(b, 100.0) for b in range(1, 65)]))
    actor.heartbeat(Heartbeat("r1", 1, 0.0, 0.5, "busy", 0, 4, 0.7, 2.0))
    assert f.values("dspark_scheduler_replicas") == [1.0]
    assert len(f.values("dspark_scheduler_budget_tokens", replica="r1")) == 1


# ----------------------------------------------------------------------------- training
def test_training_metrics_from_a_step_dict():
    f = FakeFactory()
    TrainingMetrics("demo", f).step({"loss": 2.5, "ce": 2.0, "tv": 0.3, "conf": 0.2, "tokens": 4096.0,
                                     "seconds": 0.8, "step": 7, "tau_probabilistic": 1.9, "lr": 1e-3,
                                     "micro_batches": [1, 2], "accept_rate@1": 0.5})
    assert f.totals("dspark_train_loss", "term") == {"loss": 2.5, "ce": 2.0, "tv": 0.3, "conf": 0.2}
    assert f.values("dspark_train_tokens", run="demo") == [4096.0]
    assert f.values("dspark_train_step_seconds") == [0.8]
    assert f.values("dspark_train_step") == [7.0]
    assert f.values("dspark_train_tau") == [1.9]
    assert f.values("dspark_train_learning_rate") == [1e-3]
    assert {t["run"] for _, _, _, t in f.log} == {"demo"}
