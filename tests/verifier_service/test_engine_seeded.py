"""Seeded sampled requests (position-keyed noise, ``platform.sampling``): the speculative engine gives
the tokens of plain decoding with the same seed, whatever the verify lengths, the batch and its
neighbours; a drafter that samples the target with the verifier's noise is accepted every time,
one with noise of its own far less often."""

from __future__ import annotations

import pytest
import torch

from _mocks import CyclePolicy, MockDrafter
from dspark.drafter_service.base import DraftBlock
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.sampling import logits_to_probs, sample_from_probs
from dspark.platform.target.loading import load_target
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


def mixed_requests(demo):
    texts = ["import os\n", "def main(argv):\n    ", "class Point:\n    def __init__(self, x, y):\n", "# a", "for i in"]
    ps = [tuple(demo.tokenizer(t).input_ids) for t in texts]
    params = [
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=1.0, seed=2**62 + 5, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True),  # greedy
        SamplingParams(max_tokens=22, temperature=0.7, top_k=40, seed=0, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=1.0, ignore_eos=True),  # sampled without a seed
        SamplingParams(max_tokens=19, temperature=1.3, seed=11, ignore_eos=True),  # same seed, other prompt
    ]
    return [GenerationRequest(str(i), ps[i % len(ps)], p) for i, p in enumerate(params)]


def tokens(outs, ids):
    return {i: list(outs[i].token_ids) for i in ids}


def test_seeded_sampled_output_equals_plain_decoding_whatever_the_verify_lengths(demo):
    reqs = mixed_requests(demo)
    exact = [r.request_id for r in reqs if r.params.seed is not None or r.params.temperature == 0]
    plain = tokens(VerifierEngine(demo, None, max_batch_size=8).generate(reqs), exact)
    runs = {
        "fixed γ=4, batch 8": VerifierEngine(demo, MockDrafter(demo.vocab_size, 4, oracle=demo, corrupt=0.3),
                                              FixedPolicy(), max_batch_size=8),
        "cycling ℓ incl. 0, batch 8": VerifierEngine(demo, MockDrafter(demo.vocab_size, 5, oracle=demo, seed=3),
                                                    CyclePolicy((0, 1, 3, 2, 5, 4)), max_batch_size=8),
        "fixed γ=3, batch 2": VerifierEngine(demo, MockDrafter(demo.vocab_size, 3, oracle=demo, corrupt=0.1),
                                             FixedPolicy(), max_batch_size=2),
    }
    for name, eng in runs.items():
        outs = eng.generate(reqs[::-1] if "batch 2" in name else reqs)  # other neighbours too
        assert tokens(outs, exact) == plain, name
        seeded = [outs[i] for i in exact if next(r for r in reqs if r.request_id == i).params.seed is not None]
        assert sum(o.stats.drafted for o in seeded) > 0 and sum(o.stats.accepted for o in seeded) > 0, name
    # the seed is the whole key: same seed and prompt, same tokens; another seed, other tokens
    again = VerifierEngine(demo, None).generate([GenerationRequest("x", reqs[0].prompt_token_ids, reqs[0].params)])
    assert list(again["x"].token_ids) == plain["0"]
    other = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=12, ignore_eos=True)
    assert list(VerifierEngine(demo, None).generate([GenerationRequest("y", reqs[0].prompt_token_ids, other)])["y"]
                .token_ids) != plain["0"]


class TargetSampler(MockDrafter):
    """Drafts by sampling the target itself, block slot by slot, with the request's parameters and
    either the noise the drafter contract hands out (``coupled``) or noise of its own."""

    def __init__(self, target, block_size: int, coupled: bool):
        super().__init__(target.vocab_size, block_size)
        self.target, self.coupled = target, coupled
        self.own = torch.Generator().manual_seed(99)

    @torch.no_grad()
    def propose(self, slots, anchors, positions, sampling):
        R, G, V = len(slots), self.block_size, self.vocab_size
        seqs = [self.contexts[s] + [int(a)] for s, a in zip(slots.tolist(), anchors.tolist())]
        tokens, logits = torch.zeros(R, G, dtype=torch.long), torch.zeros(R, G, V)
        for k in range(G):
            lk = torch.stack([self.target.model(input_ids=torch.tensor([s])).logits[0, -1].float() for s in seqs])
            probs = logits_to_probs(lk, sampling.temperature, sampling.top_k, sampling.top_p)
            noise = sampling.exponentials(V, step=k) if self.coupled else torch.empty(R, V).exponential_(generator=self.own)
            x = sample_from_probs(probs, noise)
            tokens[:, k], logits[:, k] = x, lk
            for s, t in zip(seqs, x.tolist()):
                s.append(t)
        return DraftBlock(tokens, logits, None)


def acceptance(demo, coupled: bool) -> float:
    p = tuple(demo.tokenizer("def f(x):\n").input_ids)
    reqs = [GenerationRequest(str(i), p, SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i, ignore_eos=True))
            for i in range(4)]
    eng = VerifierEngine(demo, TargetSampler(demo, 4, coupled), FixedPolicy(), max_batch_size=4)
    outs = eng.generate(reqs)
    plain = VerifierEngine(demo, None, max_batch_size=4).generate(reqs)
    assert {k: o.token_ids for k, o in outs.items()} == {k: o.token_ids for k, o in plain.items()}
    return sum(o.stats.accepted for o in outs.values()) / sum(o.stats.drafted for o in outs.values())


def test_a_drafter_sampling_with_the_verifiers_noise_is_always_accepted(demo):
    coupled, own = acceptance(demo, True), acceptance(demo, False)
    assert coupled >= 0.97, coupled  # p_d = p_t and the same E(key, n): the same token (up to float rounding)
    assert own < coupled - 0.2, (own, coupled)  # independent noise: agreement only by chance


def test_reproducible_seeds_off_gives_chain_rejection_sampling(demo):
    """``reproducible_seeds=False`` (EngineConfig) verifies seeded rows by rejection sampling: exact
    in distribution (tested in test_engine_distribution.py) and repeatable for the same verify
    lengths, but no longer plain decoding's tokens."""
    reqs = [r for r in mixed_requests(demo) if r.params.seed is not None]
    plain = VerifierEngine(demo, None, max_batch_size=8).generate(reqs)

    def run():
        eng = VerifierEngine(demo, MockDrafter(demo.vocab_size, 4, oracle=demo, corrupt=0.3), FixedPolicy(),
                             max_batch_size=8, reproducible_seeds=False)
        return {k: o.token_ids for k, o in eng.generate(reqs).items()}

    a, b = run(), run()
    assert a == b
    assert any(a[k] != plain[k].token_ids for k in a)
