"""The verifier engine against the target's own decoding: greedy token identity (plain and
speculative, batch 1 and 8, mixed prompt lengths, ragged verify lengths incl. 0, requests joining
mid-run), rollback, stop handling, seeded repeatability and input validation."""

from __future__ import annotations

import pytest
import torch

from _helpers import ARCHS, hf_greedy, prompts
from _mocks import CyclePolicy, MockDrafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import FixedPolicy, ThresholdPolicy
from dspark.verifier_service.engine import RequestRejected, VerifierEngine


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_decoding_batch8_matches_hf_generate(arch, tiny_checkpoints):
    t = load_target(TargetConfig(path=str(tiny_checkpoints[arch])), with_tokenizer=False)
    ps = prompts(t.vocab_size, [3, 17, 1, 9, 30, 5, 12, 2])
    eng = VerifierEngine(t, max_batch_size=8, prefill_chunk=8)
    outs = eng.generate(GenerationRequest(str(i), tuple(p), greedy(10)) for i, p in enumerate(ps))
    for i, p in enumerate(ps):
        assert list(outs[str(i)].token_ids) == hf_greedy(t, p, 10), (arch, i)


def test_speculative_batch1_matches_hf_generate(demo):
    p = demo.tokenizer("def add(a, b):\n    return").input_ids
    eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 4, oracle=demo), FixedPolicy())
    out = eng.generate([GenerationRequest("a", tuple(p), greedy(24))])["a"]
    assert list(out.token_ids) == hf_greedy(demo, p, 24)
    assert out.stats.accepted > 0 and out.stats.tau > 1.0  # the oracle drafts get accepted
    assert out.stats.fallback_steps == 0 and eng.context_failures == 0


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_speculative_batch8_ragged_lengths_and_joins(arch, tiny_checkpoints):
    t = load_target(TargetConfig(path=str(tiny_checkpoints[arch])), with_tokenizer=False)
    ps = prompts(t.vocab_size, [4, 19, 1, 8, 27, 6, 13, 3, 10, 2], seed=3)
    drafter = MockDrafter(t.vocab_size, 4, oracle=t, corrupt=0.4)
    eng = VerifierEngine(t, drafter, CyclePolicy(), max_batch_size=8, prefill_chunk=8)
    final = {}
    for i in range(4):  # four start now, the rest join while others run
        eng.add_request(GenerationRequest(str(i), tuple(ps[i]), greedy(9 + i)))
    step = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        step += 1
        if step in (2, 4, 5):
            for i in {2: (4, 5), 4: (6, 7, 8), 5: (9,)}[step]:
                eng.add_request(GenerationRequest(str(i), tuple(ps[i]), greedy(9 + i)))
    assert len(final) == len(ps)
    for i, p in enumerate(ps):
        assert list(final[str(i)].token_ids) == hf_greedy(t, p, 9 + i), (arch, i)
    total = sum(o.stats.accepted for o in final.values())
    assert total > 0 and any(o.stats.drafted > o.stats.accepted for o in final.values())
    assert eng.total_fallback_steps == 0 and eng.context_failures == 0


def test_rollback_leaves_cache_equal_to_fresh_prefill(demo):
    p = demo.tokenizer("import sys\n\ndef main():\n").input_ids
    eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 5, oracle=demo, corrupt=0.5), FixedPolicy(), max_batch_size=2)
    eng.add_request(GenerationRequest("a", tuple(p), greedy(40)))
    for _ in range(4):
        eng.step()
    r = eng.running[0]
    committed = list(p) + r.generated[:-1]  # the newest token (anchor) is not in the KV yet
    assert int(eng.cache.lengths[0]) == len(committed) == r.position
    fresh = VerifierEngine(demo, max_batch_size=1)
    fresh.add_request(GenerationRequest("b", tuple(committed), greedy(1)))
    fresh.cache.set_length(0, 0)
    fresh.running.append(fresh.waiting.popleft())
    fresh._prefill(0, fresh.running)
    for layer in range(demo.num_layers):
        k1, v1 = eng.cache.layer_kv(layer, 0)
        k2, v2 = fresh.cache.layer_kv(layer, 0)
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


def test_threshold_policy_and_confidences(demo):
    p = demo.tokenizer("class Foo:\n").input_ids
    drafter = MockDrafter(demo.vocab_size, 6, oracle=demo)
    eng = VerifierEngine(demo, drafter, ThresholdPolicy(0.5))
    out = eng.generate([GenerationRequest("a", tuple(p), greedy(20))])["a"]
    assert list(out.token_ids) == hf_greedy(demo, p, 20)


def test_drafter_failure_falls_back_to_plain_decoding(demo):
    p = demo.tokenizer("for i in range(").input_ids
    drafter = MockDrafter(demo.vocab_size, 4, oracle=demo, fail_after=2)
    eng = VerifierEngine(demo, drafter, FixedPolicy())
    out = eng.generate([GenerationRequest("a", tuple(p), greedy(16))])["a"]
    assert list(out.token_ids) == hf_greedy(demo, p, 16)
    assert out.stats.fallback_steps > 0 and eng.total_fallback_steps > 0


def test_stop_tokens_strings_and_max_tokens(demo):
    p = tuple(demo.tokenizer("def f(x):\n").input_ids)
    ref = hf_greedy(demo, list(p), 30)
    eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 4, oracle=demo), FixedPolicy())
    stop_tok = ref[5]
    out = eng.generate([GenerationRequest("t", p, SamplingParams(max_tokens=30, stop_token_ids=(stop_tok,), ignore_eos=True))])["t"]
    assert out.finish_reason == "stop" and list(out.token_ids) == ref[: ref.index(stop_tok) + 1]
    text = demo.tokenizer.decode(ref)
    stop_s = text[len(text) // 2 : len(text) // 2 + 3]
    out = eng.generate([GenerationRequest("s", p, SamplingParams(max_tokens=30, stop=(stop_s,), ignore_eos=True))])["s"]
    got = demo.tokenizer.decode(list(out.token_ids))
    assert out.finish_reason == "stop" and stop_s in got and stop_s not in demo.tokenizer.decode(list(out.token_ids[:-1]))
    assert list(out.token_ids) == ref[: len(out.token_ids)]
    out = eng.generate([GenerationRequest("m", p, SamplingParams(max_tokens=7, ignore_eos=True))])["m"]
    assert out.finish_reason == "length" and list(out.token_ids) == ref[:7]


def test_seeded_sampling_repeats_exactly(demo):
    p = tuple(demo.tokenizer("import os\n").input_ids)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)

    def run():
        eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 4, oracle=demo), FixedPolicy())
        return eng.generate([GenerationRequest("a", p, params)])["a"].token_ids

    a, b = run(), run()
    assert a == b and len(a) == 20


def test_abort_frees_the_slot(demo):
    eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 3), FixedPolicy(), max_batch_size=2)
    for i in range(3):
        eng.add_request(GenerationRequest(str(i), (5, 6, 7), greedy(50)))
    eng.step()
    assert eng.num_running == 2 and len(eng.waiting) == 1
    out = eng.abort("0")
    assert out.finished and out.finish_reason == "abort"
    assert eng.abort("nope") is None
    eng.step()  # request 2 takes the freed slot
    assert {r.request.request_id for r in eng.running} == {"1", "2"}


def test_bad_requests_are_refused_with_reasons(demo):
    eng = VerifierEngine(demo, max_model_len=64)
    with pytest.raises(RequestRejected, match="exceeds the context length"):
        eng.add_request(GenerationRequest("a", (1,) * 60, greedy(10)))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.add_request(GenerationRequest("b", (demo.vocab_size + 5,), greedy(3)))
    eng.add_request(GenerationRequest("c", (3,), greedy(3)))
    with pytest.raises(RequestRejected, match="already in use"):
        eng.add_request(GenerationRequest("c", (3,), greedy(3)))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest("d", ())


class _FlakyContext(MockDrafter):
    """append_context fails on its n-th call (after prefills, inside a verify step)."""

    def __init__(self, *a, fail_on: int, **kw):
        super().__init__(*a, **kw)
        self.fail_on, self.appends = fail_on, 0

    def append_context(self, slots, tokens, features, last_hidden, lengths):
        self.appends += 1
        if self.appends == self.fail_on:
            raise RuntimeError("mock context failure")
        super().append_context(slots, tokens, features, last_hidden, lengths)


def test_lost_drafter_context_degrades_those_requests_to_plain_decoding(demo):
    ps = prompts(demo.vocab_size, [5, 9], seed=4)
    drafter = _FlakyContext(demo.vocab_size, 4, oracle=demo, fail_on=1)  # the first prefill's append fails
    eng = VerifierEngine(demo, drafter, FixedPolicy(), max_batch_size=2)
    eng.add_request(GenerationRequest("a", tuple(ps[0]), greedy(12)))
    eng.step()  # "a" is admitted alone; its context append fails
    eng.add_request(GenerationRequest("b", tuple(ps[1]), greedy(12)))
    final = {}
    while eng.has_unfinished():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.context_failures == 1 and eng.total_fallback_steps == 0
    assert final["a"].stats.drafted == 0  # "a" decoded plainly ...
    assert final["b"].stats.accepted > 0  # ... while "b" kept drafting in the same batches
    for rid, p in zip("ab", ps):
        assert list(final[rid].token_ids) == hf_greedy(demo, p, 12)
