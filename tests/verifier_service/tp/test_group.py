"""The tensor-parallel replica on real Ray: a TP=2 ``TPGroup`` (two rank actors, gloo) emits the
same outputs, step for step, as a plain TP=1 engine for a batch of mixed greedy, seeded and
unseeded sampled requests with a colocated drafter, through joins, a rejection, an abort and a verify budget;
``shutdown`` leaves no actor and no placement group. A rank dying surfaces as an error from
``step()``, not a hang. The consistency check itself is tested without Ray."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

import _helpers
from _helpers import MASK_ID, drafter_config, prompts, randomize
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, RequestOutput, RequestStats, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import RequestRejected, VerifierEngine
from dspark.verifier_service.tp.group import (
    ShardedEngineFactory,
    TPDivergenceError,
    TPGroup,
    TPGroupError,
    check_agreement,
    outputs_digest,
)

ENGINE_KW = dict(max_batch_size=3, prefill_chunk=8)


def drafter(target):
    """The same untrained drafter on every rank and in the TP=1 reference."""
    torch.manual_seed(0)
    d = build_drafter(drafter_config("dspark-vanilla"), target, mask_token_id=MASK_ID)
    randomize(d, 0)
    return d


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from ray import cloudpickle

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the engine factory refers to this module and to tests/_helpers, which the workers cannot import
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(_helpers)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def factory(ckpt, with_drafter: bool) -> ShardedEngineFactory:
    kw = dict(ENGINE_KW, policy=FixedPolicy()) if with_drafter else ENGINE_KW
    return ShardedEngineFactory(TargetConfig(path=str(ckpt)), kw, drafter if with_drafter else None, with_tokenizer=False)


def requests(vocab: int) -> list[GenerationRequest]:
    ps = prompts(vocab, [6, 19, 2, 11, 8], seed=5)
    out = []
    for i, p in enumerate(ps):
        sp = (SamplingParams(max_tokens=12 + i, ignore_eos=True) if i % 2 == 0 else  # greedy, seeded, unseeded
              SamplingParams(max_tokens=12 + i, temperature=0.9, top_p=0.95, seed=40 + i if i == 1 else None,
                             ignore_eos=True))
        out.append(GenerationRequest(f"q{i}", tuple(p), sp))
    return out


def drive(engine) -> list[list[RequestOutput]]:
    """The same call sequence on an engine or a group: requests joining over several steps, a
    rejected request, an abort and a verify budget; returns every step's outputs."""
    reqs = requests(320)
    for r in reqs[:2]:
        engine.add_request(r)
    with pytest.raises(RequestRejected, match="already in use"):
        engine.add_request(reqs[0])
    steps = []
    while engine.has_unfinished() or len(steps) < 3:
        steps.append(engine.step())
        if len(steps) == 1:
            for r in reqs[2:]:
                engine.add_request(r)
        if len(steps) == 2:
            assert engine.abort("q0").finish_reason == "abort"  # running
            assert engine.abort("q4").finish_reason == "abort"  # still waiting for a slot
            assert engine.abort("nope") is None
            engine.verify_budget = 2
    assert engine.num_running == 0
    return steps


@pytest.fixture(scope="module")
def group(ray_session, tiny_checkpoints):
    """One TP=2 group for the module (starting one costs seconds); the last test kills a rank."""
    g = TPGroup(factory(tiny_checkpoints["qwen3"], with_drafter=True), 2, step_timeout_s=60)
    yield g
    g.shutdown()


@pytest.mark.ray
def test_tp2_group_matches_tp1_engine(group, tiny_checkpoints):
    target = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    expected = drive(VerifierEngine(target, drafter(target), FixedPolicy(), **ENGINE_KW))
    assert group.backend == "gloo" and not group.has_unfinished()
    got = drive(group)
    assert got == expected  # every step's outputs, stats included
    assert sum(o.stats.drafted for step in got for o in step if o.finished) > 0


@pytest.mark.ray
def test_dead_rank_fails_the_step_and_shutdown_cleans_up(group, ray_session):
    ray = ray_session
    from ray.util import placement_group_table

    group.verify_budget = None
    group.add_request(GenerationRequest("a", (3, 4, 5), SamplingParams(max_tokens=20, ignore_eos=True)))
    assert [o.request_id for o in group.step()] == ["a", "a"]  # prefill token, then a verify step
    actors, pg = list(group._actors), group._pg
    ray.kill(actors[1], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(TPGroupError, match="rank 1 failed"):
        group.step()
    assert time.monotonic() - t0 < 30  # not the step timeout: the dead rank answers at once
    with pytest.raises(TPGroupError, match="broken"):
        group.step()

    group.shutdown()
    group.shutdown()  # idempotent
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.state.remote(), timeout=30)
    assert placement_group_table(pg)["state"] == "REMOVED"
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_consistency_check():
    stats = RequestStats()
    a = [RequestOutput("x", (1, 2), (1, 2), False, None, stats)]
    b = [RequestOutput("x", (1, 3), (1, 3), False, None, stats)]
    assert outputs_digest(a) == outputs_digest(list(a)) != outputs_digest(b)
    check_agreement([outputs_digest(a)] * 3, "step")
    with pytest.raises(TPDivergenceError, match=r"ranks \[1\] disagree with rank 0"):
        check_agreement([outputs_digest(a), outputs_digest(b)], "step")


class _WorkerActor:
    """A draft worker (``DraftWorkerCore``) as a plain Ray actor, standing in for the Serve
    deployment: the transport below is what rank 0 calls."""

    def __init__(self, ckpt: str):
        from dspark.drafter_service.worker import DraftWorkerCore

        target = load_target(TargetConfig(path=ckpt), with_tokenizer=False)
        self.core = DraftWorkerCore(lambda: drafter(target), max_sessions=4)

    def call(self, call):
        return self.core.call(call)

    def sessions(self) -> list[str]:
        return list(self.core._sessions)


class _ActorTransport:
    def __init__(self, actor):
        self.actor = actor

    def __call__(self, call):
        import ray

        return ray.get(self.actor.call.remote(call), timeout=60)


@pytest.mark.ray
def test_tp2_with_remote_drafter_matches_tp1_and_drafts_once_per_step(ray_session, tiny_checkpoints):
    """Disaggregated drafting under TP: only rank 0 calls the draft worker; the other rank mirrors
    its outcomes (``BroadcastDrafter``), so the group emits what one engine with the same remote
    drafter emits, sampled rows included (their random streams stay in step)."""
    ray = ray_session
    from dspark.drafter_service.remote import RemoteDrafter, RemoteDrafterSpec
    from dspark.drafter_service.worker import DraftWorkerCore

    ckpt = str(tiny_checkpoints["qwen3"])
    target = load_target(TargetConfig(path=ckpt), with_tokenizer=False)
    gamma = drafter(target).block_size
    core = DraftWorkerCore(lambda: drafter(target), max_sessions=4)
    local = RemoteDrafter(core.call, gamma, target.vocab_size, session="tp1")
    expected = drive(VerifierEngine(target, local, FixedPolicy(), **ENGINE_KW))

    worker = ray.remote(_WorkerActor).options(num_cpus=0).remote(ckpt)
    spec = RemoteDrafterSpec(_ActorTransport(worker), gamma, target.vocab_size, session="tp2")
    kw = dict(ENGINE_KW, policy=FixedPolicy())
    group = TPGroup(ShardedEngineFactory(TargetConfig(path=ckpt), kw, None, with_tokenizer=False, remote_drafter=spec),
                    2, num_cpus=0.5, step_timeout_s=60)
    try:
        assert group.drafter is not None and group.gamma == gamma
        records = []
        group.add_observer(records.append)
        got = drive(group)
        assert got == expected
        assert sum(o.stats.drafted for step in got for o in step if o.finished) > 0
        assert records and group.timings.steps == len(records)  # rank 0's step records reach the caller
        # one session on the worker: rank 1 never called it
        assert ray.get(worker.sessions.remote()) == ["tp2"]
    finally:
        group.shutdown()
