"""Disaggregated drafting without Ray: the engine drafting through ``RemoteDrafter`` ->
``DraftWorkerCore`` gives the target's own greedy tokens and the same drafts as a local drafter
with the same weights; transport failures, a worker restart (session lost) and a retried call
lose no request and no context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import MASK_ID, drafter_config, hf_greedy, prompts, randomize
from dspark.drafter_service.registry import build_drafter
from dspark.drafter_service.remote import DraftSessionLost, RemoteDrafter
from dspark.drafter_service.worker import DraftWorkerCore
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.sampling import SamplingBatch
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


def factory(target):
    def make():
        torch.manual_seed(0)
        d = build_drafter(drafter_config("dspark-gated"), target, mask_token_id=MASK_ID)
        randomize(d, 0)
        return d
    return make


def requests(target, n=5, temperature=0.0, seeded=True):
    ps = prompts(target.vocab_size, [5, 12, 3, 9, 7, 4, 6][:n], seed=4)
    return ps, [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=9 + 2 * i, ignore_eos=True,
                                                                   temperature=temperature, seed=i if seeded else None))
                for i, p in enumerate(ps)]


def run(target, drafter, reqs):
    eng = VerifierEngine(target, drafter, FixedPolicy(), max_batch_size=4)
    records = []
    eng.add_observer(records.append)
    outs = eng.generate(reqs)
    return eng, records, {k: list(o.token_ids) for k, o in outs.items()}


def test_remote_drafts_exactly_as_local(target):
    ps, reqs = requests(target)
    local_eng, local_rec, local = run(target, factory(target)(), reqs)
    worker = DraftWorkerCore(factory(target))
    remote = RemoteDrafter(worker.call, 4, target.vocab_size)
    eng, rec, out = run(target, remote, reqs)
    assert out == local
    for i, p in enumerate(ps):
        assert out[str(i)] == hf_greedy(target, p, 9 + 2 * i)
    assert [r.accepted for r in rec] == [r.accepted for r in local_rec]
    for a, b in zip(rec, local_rec):
        if a.confidences is not None:
            assert np.allclose(a.confidences, b.confidences, atol=1e-6)
    assert eng.total_fallback_steps == 0 and remote.failures == 0
    # one call per drafting step; greedy replies carry no logits
    assert remote.calls == sum(r.confidences is not None for r in rec)
    assert remote.received_bytes <= remote.calls * 4 * 4 * (8 + 4)  # ids + confidences only


def test_unseeded_sampled_requests_get_their_draft_logits_and_repeat(target):
    _, reqs = requests(target, temperature=1.0, seeded=False)
    outs = []
    for _ in range(2):
        worker = DraftWorkerCore(factory(target))
        remote = RemoteDrafter(worker.call, 4, target.vocab_size)
        eng, rec, out = run(target, remote, reqs)
        outs.append(out)
        assert eng.total_fallback_steps == 0 and sum(sum(r.accepted) for r in rec) > 0
        assert remote.received_bytes > remote.calls * 4 * target.vocab_size * 4  # [R, γ, V] float32 logits
    assert outs[0] == outs[1]  # same engine seed and verify lengths: identical across runs


def test_seeded_sampled_requests_draft_with_the_verifiers_noise_and_need_no_logits(target):
    _, reqs = requests(target, temperature=1.0)
    plain = VerifierEngine(target, None).generate(reqs)
    local_eng, local_rec, local = run(target, factory(target)(), reqs)
    worker = DraftWorkerCore(factory(target))
    remote = RemoteDrafter(worker.call, 4, target.vocab_size)
    eng, rec, out = run(target, remote, reqs)
    assert out == local == {k: list(o.token_ids) for k, o in plain.items()}  # the target's own seeded samples
    assert [r.accepted for r in rec] == [r.accepted for r in local_rec]  # the worker drew the local drafter's noise
    assert eng.total_fallback_steps == 0 and sum(sum(r.accepted) for r in rec) > 0
    assert remote.received_bytes <= remote.calls * 4 * 4 * (8 + 4)  # ids + confidences only, as for greedy


def test_mixed_batch_through_the_worker_keeps_seeded_and_greedy_exact(target):
    """Greedy, seeded and unseeded sampled rows in one batch: only the unseeded ones get draft
    logits back; the matched rows verify against one-hot p_d built from their draft tokens."""
    _, reqs = requests(target, n=6, temperature=0.9)
    reqs = [GenerationRequest(r.request_id, r.prompt_token_ids,
                              SamplingParams(max_tokens=r.params.max_tokens, ignore_eos=True) if i % 3 == 0 else
                              r.params if i % 3 == 1 else
                              SamplingParams(max_tokens=r.params.max_tokens, temperature=0.9, ignore_eos=True))
            for i, r in enumerate(reqs)]
    plain = VerifierEngine(target, None).generate(reqs)
    worker = DraftWorkerCore(factory(target))
    remote = RemoteDrafter(worker.call, 4, target.vocab_size)
    eng, rec, out = run(target, remote, reqs)
    exact = [r.request_id for i, r in enumerate(reqs) if i % 3 != 2]
    assert {k: out[k] for k in exact} == {k: list(plain[k].token_ids) for k in exact}
    assert eng.total_fallback_steps == 0 and sum(sum(r.accepted) for r in rec) > 0
    assert all(len(out[r.request_id]) == r.params.max_tokens for r in reqs)


def test_transport_failures_fall_back_and_retries_do_not_double_apply(target):
    ps, reqs = requests(target)
    worker = DraftWorkerCore(factory(target))
    state = {"n": 0, "checked": 0}

    def in_step(call):
        """After a call is applied, the worker's contexts equal the replica's view of them."""
        reply = worker.call(call)
        d = worker._sessions[call.session].drafter
        assert [d.context_length(s) for s in range(call.max_slots)] == remote._lengths
        state["checked"] += 1
        return reply

    def flaky(call):
        state["n"] += 1
        if state["n"] in (3, 4):
            raise TimeoutError("draft worker too slow")
        if state["n"] == 6:  # the call arrives and is applied, but the reply is lost
            worker.call(call)
            raise TimeoutError("reply lost")
        return in_step(call)

    remote = RemoteDrafter(flaky, 4, target.vocab_size, retry_min_s=0.0)  # no back-off: every step retries
    eng, rec, out = run(target, remote, reqs)
    for i, p in enumerate(ps):
        assert out[str(i)] == hf_greedy(target, p, 9 + 2 * i)
    assert remote.failures == 3 and eng.total_fallback_steps == 3 and eng.context_failures == 0
    assert state["checked"] > 5  # the re-sent call after the lost reply was not applied twice


def test_a_restarted_worker_loses_the_session_and_speculation_resumes(target):
    ps, reqs = requests(target, n=7)
    box = {"worker": DraftWorkerCore(factory(target))}
    remote = RemoteDrafter(lambda call: box["worker"].call(call), 4, target.vocab_size)
    eng = VerifierEngine(target, remote, FixedPolicy(), max_batch_size=3)
    for r in reqs[:3]:
        eng.add_request(r)
    final = {}
    for step in range(200):
        if step == 3:
            box["worker"] = DraftWorkerCore(factory(target))  # restarted: no sessions
        if step == 6:
            for r in reqs[3:]:
                eng.add_request(r)
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        if not eng.has_unfinished():
            break
    for i, p in enumerate(ps):
        assert list(final[str(i)].token_ids) == hf_greedy(target, p, 9 + 2 * i)
    assert remote.sessions_lost == 1 and eng.context_failures >= 1
    assert all(final[str(i)].stats.drafted > 0 for i in range(3, 7))  # later requests draft again
    remote._stale.add(0)  # a stale slot refuses drafting and context until it is reset
    with pytest.raises(DraftSessionLost):
        remote.propose(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), SamplingBatch.from_params([(0.0, 0, 1.0)], [None]))
    with pytest.raises(DraftSessionLost):
        remote.append_context(torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8),
                              torch.tensor([1]))
    remote.reset_slot(0)
    assert 0 not in remote._stale
