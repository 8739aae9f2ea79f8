"""The pre-draft gate and the deferred drafter context: a step whose policy decides not to draft
skips the draft pass and hands the committed tokens' features to the drafter later, in one batch;
the drafter's context, its drafts and the greedy output are exactly those of an engine that hands
them over at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import MASK_ID, drafter_config, hf_greedy, prompts, randomize
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import BatchView, FixedPolicy, Policy
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


class EveryThird(Policy):
    """Drafts on every third step (plan), verifies the whole block when it does."""

    def __init__(self):
        self.plans = 0

    def plan(self, view: BatchView) -> bool:
        self.plans += 1
        return self.plans % 3 == 0

    def choose(self, view: BatchView) -> list[int]:
        return view.limits().tolist()


def run(target, kind_id, max_deferred, policy=None):
    torch.manual_seed(0)
    d = build_drafter(drafter_config(kind_id), target, mask_token_id=MASK_ID)
    randomize(d, 0)
    eng = VerifierEngine(target, d, policy or EveryThird(), max_batch_size=4, max_deferred_context=max_deferred)
    records = []
    eng.add_observer(records.append)
    ps = prompts(target.vocab_size, [5, 12, 3, 9, 7], seed=4)
    reqs = [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True)) for i, p in enumerate(ps)]
    outs = eng.generate(reqs)
    return eng, records, {k: list(o.token_ids) for k, o in outs.items()}, ps


@pytest.mark.parametrize("kind_id", ["dspark-gated", "eagle3"])
def test_deferred_context_drafts_exactly_as_immediate(target, kind_id):
    now, rec_now, out_now, ps = run(target, kind_id, 0)
    later, rec_later, out_later, _ = run(target, kind_id, 64)
    capped, rec_capped, out_capped, _ = run(target, kind_id, 2)  # flushed whenever 2 tokens wait
    assert out_now == out_later == out_capped
    for i, p in enumerate(ps):  # greedy: the target's own tokens
        assert out_now[str(i)] == hf_greedy(target, p, 10 + 3 * i)
    assert now.skipped_draft_steps > 0 and now.skipped_draft_steps == later.skipped_draft_steps
    assert now.context.deferred_tokens == 0 and later.context.deferred_tokens > 0 and later.context.flushes > 0
    assert capped.context.flushes > later.context.flushes
    drafted = [r for r in rec_now if r.confidences is not None]
    assert drafted and len(drafted) == len([r for r in rec_later if r.confidences is not None])
    for a, b, c in zip(drafted, [r for r in rec_later if r.confidences is not None],
                       [r for r in rec_capped if r.confidences is not None]):
        # the same context gives the same drafts: same confidences, same acceptance
        assert a.request_ids == b.request_ids == c.request_ids and a.accepted == b.accepted == c.accepted
        assert np.allclose(a.confidences, b.confidences, atol=1e-5) and np.allclose(a.confidences, c.confidences, atol=1e-5)
    assert later.context_failures == 0 and not later.context._pending  # nothing left behind by finished requests


def test_skipped_steps_do_not_call_the_drafter(target):
    class Never(EveryThird):
        def plan(self, view):
            return False

    eng, records, out, _ = run(target, "dspark-gated", 64, Never())
    assert eng.skipped_draft_steps == len(records) and all(sum(r.lengths) == 0 for r in records)
    assert eng.timings.draft_s < 0.05 * eng.timings.verify_s  # no draft pass ran
    plain = VerifierEngine(target, None, max_batch_size=4)
    ps = prompts(target.vocab_size, [5, 12, 3, 9, 7], seed=4)
    ref = plain.generate([GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True))
                          for i, p in enumerate(ps)])
    assert out == {k: list(o.token_ids) for k, o in ref.items()}


def test_a_failing_flush_stops_drafting_for_those_requests_only(target):
    eng, _, _, _ = run(target, "dspark-gated", 64, FixedPolicy())
    calls = {"n": 0}
    real = eng.drafter.append_context

    def flaky(slots, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(slots, *a, **k)

    eng.drafter.append_context = flaky
    pol = EveryThird()
    eng.policy = pol
    ps = prompts(target.vocab_size, [6, 4], seed=9)
    outs = eng.generate([GenerationRequest(f"x{i}", tuple(p), SamplingParams(max_tokens=12, ignore_eos=True))
                         for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert list(outs[f"x{i}"].token_ids) == hf_greedy(target, p, 12)
    assert eng.context_failures == 1
