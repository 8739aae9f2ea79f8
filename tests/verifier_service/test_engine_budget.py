"""The engine's policy call: a ``BatchView`` with request ids, per-request caps and the cluster's
verify budget, enforced whatever the policy returns."""

from __future__ import annotations

import pytest

from _mocks import CyclePolicy, MockDrafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import BatchView, FixedPolicy
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


def requests(n: int = 4, max_tokens: int = 10):
    return [GenerationRequest(f"q{i}", (3 + i, 7, 11 + i), SamplingParams(max_tokens=max_tokens, temperature=0.0))
            for i in range(n)]


def run(target, policy, budget=None):
    drafter = MockDrafter(target.vocab_size, 4, oracle=target, corrupt=0.2)
    eng = VerifierEngine(target, drafter, policy, max_batch_size=4)
    eng.verify_budget = budget
    records = []
    eng.add_observer(records.append)
    outs = eng.generate(requests())
    return {k: o.token_ids for k, o in outs.items()}, records, drafter


class Spy:
    """Records the views it is given; verifies everything (and more) to test the caps."""

    def __init__(self):
        self.views: list[BatchView] = []

    def choose(self, view: BatchView) -> list[int]:
        self.views.append(view)
        return [view.gamma + 3] * view.num_requests


def test_budget_caps_every_step_and_keeps_greedy_output(target):
    plain, _, _ = run(target, FixedPolicy(0))
    full, full_records, _ = run(target, FixedPolicy())
    capped, records, _ = run(target, FixedPolicy(), budget=3)
    assert full == plain and capped == plain  # greedy: the same tokens whatever is verified
    assert max(sum(r.lengths) for r in full_records) > 3
    assert all(sum(r.lengths) <= 3 for r in records)


def test_zero_budget_is_plain_decoding_without_drafting(target):
    plain, _, _ = run(target, FixedPolicy(0))
    out, records, drafter = run(target, FixedPolicy(), budget=0)
    assert out == plain and drafter.calls == 0
    assert all(sum(r.lengths) == 0 for r in records)


def test_the_view_carries_ids_and_caps(target):
    spy = Spy()
    _, records, _ = run(target, spy, budget=6)
    assert spy.views and all(v.budget_tokens == 6 for v in spy.views)
    assert set(spy.views[0].request_ids) == {"q0", "q1", "q2", "q3"}
    assert all(v.confidences.shape == (v.num_requests, 4) for v in spy.views)
    # near the end, max_tokens caps what a request may verify, and the engine enforces it
    assert any(min(v.max_lengths) < 4 for v in spy.views)
    for v, r in zip(spy.views, records):
        assert all(l <= m for l, m in zip(r.lengths, v.limits())) and sum(r.lengths) <= 6


def test_the_first_policy_interface_still_works(target):
    plain, _, _ = run(target, FixedPolicy(0))
    out, records, _ = run(target, CyclePolicy(), budget=2)
    assert out == plain and all(sum(r.lengths) <= 2 for r in records)
