"""Every real drafter provider inside the engine: greedy output is token-identical to the
target's own ``generate``, at batch 1 and at batch 8 with mixed prompt lengths, ragged verify
lengths (0 included) and requests joining mid-run; the drafter's context cache tracks the
target's committed length through acceptance, rollback and slot compaction.

The drafters are untrained (weights re-drawn so their drafts depend visibly on the context);
the acceptance-heavy paths are covered with an oracle drafter in ``test_engine.py``."""

from __future__ import annotations

import pytest
import torch

from _helpers import KIND_IDS, MASK_ID, drafter_config, hf_greedy, prompts, randomize
from _mocks import CyclePolicy
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def targets(tiny_checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_target(TargetConfig(path=str(tiny_checkpoints[arch])), with_tokenizer=False)
        return cache[arch]

    return get


def make(kind_id, target, seed=0):
    torch.manual_seed(seed)
    d = build_drafter(drafter_config(kind_id), target, mask_token_id=MASK_ID)
    randomize(d, seed)
    return d


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def assert_in_sync(eng):
    for slot, r in enumerate(eng.running):
        assert eng.drafter.context_length(slot) == int(eng.cache.lengths[slot]) == r.position


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_batch1_greedy_identity(kind_id, targets):
    t = targets("qwen3")
    p = prompts(t.vocab_size, [11], seed=1)[0]
    eng = VerifierEngine(t, make(kind_id, t), FixedPolicy())
    out = eng.generate([GenerationRequest("a", tuple(p), greedy(14))])["a"]
    assert list(out.token_ids) == hf_greedy(t, p, 14)
    assert out.stats.drafted > 0 and out.stats.fallback_steps == 0 and eng.context_failures == 0


@pytest.mark.parametrize("arch,kind_id", [("qwen3", k) for k in KIND_IDS] + [("qwen3_moe", "dspark-vanilla"), ("deepseek_v3", "dspark-gated")])
def test_batch8_mixed_lengths_and_joins(arch, kind_id, targets):
    t = targets(arch)
    ps = prompts(t.vocab_size, [4, 19, 1, 8, 27, 6, 13, 3, 10, 2], seed=3)
    eng = VerifierEngine(t, make(kind_id, t), CyclePolicy(), max_batch_size=8, prefill_chunk=8)
    final, step = {}, 0
    for i in range(4):
        eng.add_request(GenerationRequest(str(i), tuple(ps[i]), greedy(6 + i)))
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        assert_in_sync(eng)
        step += 1
        for i in {1: (4, 5), 3: (6, 7, 8), 4: (9,)}.get(step, ()):
            eng.add_request(GenerationRequest(str(i), tuple(ps[i]), greedy(6 + i)))
    assert len(final) == len(ps)
    for i, p in enumerate(ps):
        assert list(final[str(i)].token_ids) == hf_greedy(t, p, 6 + i), (arch, kind_id, i)
    assert sum(o.stats.drafted for o in final.values()) > 0
    assert eng.total_fallback_steps == 0 and eng.context_failures == 0


def test_seeded_sampling_with_a_real_drafter_repeats(targets):
    t = targets("qwen3")
    ps = prompts(t.vocab_size, [5, 9, 2], seed=7)

    def run():
        eng = VerifierEngine(t, make("dspark-vanilla", t), FixedPolicy(), max_batch_size=4)
        reqs = [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=i,
                                                                   ignore_eos=True)) for i, p in enumerate(ps)]
        return {k: v.token_ids for k, v in eng.generate(reqs).items()}

    assert run() == run()
