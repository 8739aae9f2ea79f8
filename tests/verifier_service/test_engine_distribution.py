"""Sampling through the real engine reproduces the target's distribution (chi-square on a
tiny-vocabulary target, with a deliberately different draft distribution), at T=1 and with
top-k/top-p, for seeded requests (position-keyed noise, verified by matching) and unseeded ones
(chain rejection sampling); a sabotaged verifier (drafts accepted unconditionally) is caught by
the same test on both paths."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

import dspark.verifier_service.engine as engine_mod
from _mocks import MockDrafter
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.sampling import logits_to_probs
from dspark.platform.target.loading import FrozenTarget
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import VerifierEngine

V = 6
PROMPT = (1, 2, 3)


@pytest.fixture(scope="module")
def small_vocab_target():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=64, eos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # sharpen the random model so its conditionals differ clearly per context
        model.lm_head.weight.mul_(60.0)
    return FrozenTarget(model, layer_ids=(0, 1))


def exact_pair_distribution(t: FrozenTarget, T: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V*V] exact P(x2, x3) after PROMPT, marginalising x1, under the processed target."""
    def probs(seqs):
        logits = t(torch.tensor(seqs)).logits[:, -1].float()
        n = len(seqs)
        return logits_to_probs(logits, torch.full((n,), T), torch.full((n,), top_k), torch.full((n,), top_p))

    p1 = probs([list(PROMPT)])[0]  # [V]
    p2 = probs([list(PROMPT) + [a] for a in range(V)])  # [V, V]
    seqs = [list(PROMPT) + [a, b] for a, b in itertools.product(range(V), range(V))]
    p3 = probs(seqs).view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3  # [x1, x2, x3]
    return joint.sum(0).reshape(-1)


def sampled_pairs(t, n: int, T: float, top_k: int, top_p: float, seeded: bool) -> torch.Tensor:
    drafter = MockDrafter(V, 3, seed=5)  # its Markov chain is unrelated to the target
    eng = VerifierEngine(t, drafter, FixedPolicy(), max_batch_size=128)
    reqs = [GenerationRequest(str(i), PROMPT, SamplingParams(max_tokens=3, temperature=T, top_k=top_k, top_p=top_p,
                                                              seed=i if seeded else None, ignore_eos=True))
            for i in range(n)]
    outs = eng.generate(reqs)
    counts = torch.zeros(V * V)
    for o in outs.values():
        counts[o.token_ids[1] * V + o.token_ids[2]] += 1
    assert sum(o.stats.drafted for o in outs.values()) > 0
    return counts


def chi2_p(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    keep = expected_probs > 0
    assert counts[~keep].sum() == 0, "sampled a token the processed target gives probability 0"
    exp = expected_probs[keep] / expected_probs[keep].sum() * counts.sum()
    return chisquare(counts[keep].numpy(), exp.numpy()).pvalue


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.8, 4, 0.9)])
def test_engine_sampling_matches_target_distribution(small_vocab_target, T, top_k, top_p, seeded):
    expected = exact_pair_distribution(small_vocab_target, T, top_k, top_p)
    counts = sampled_pairs(small_vocab_target, 3000, T, top_k, top_p, seeded)
    assert chi2_p(counts, expected) > 1e-3


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_sabotaged_verifier_is_caught(small_vocab_target, monkeypatch, seeded):
    real_rejection, real_match = engine_mod.rejection_sample, engine_mod.greedy_verify

    def accept_everything(draft_tokens, draft_probs, target_probs, cu, uniforms, noise):
        return real_rejection(draft_tokens, draft_probs, target_probs, cu, torch.zeros_like(uniforms) - 1.0, noise)

    def match_everything(draft_tokens, target_tokens, cu):  # every draft "equals" the target's token
        req = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())
        forged = target_tokens.clone()
        forged[torch.arange(draft_tokens.numel()) + req] = draft_tokens
        return real_match(draft_tokens, forged, cu)

    monkeypatch.setattr(engine_mod, "rejection_sample", accept_everything)
    monkeypatch.setattr(engine_mod, "greedy_verify", match_everything)
    expected = exact_pair_distribution(small_vocab_target, 1.0, 0, 1.0)
    counts = sampled_pairs(small_vocab_target, 3000, 1.0, 0, 1.0, seeded)
    assert chi2_p(counts, expected) < 1e-6
