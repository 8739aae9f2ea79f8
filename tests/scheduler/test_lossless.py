"""The verify-length policies are lossless; a global search without the early break is not.

1. DSpark paper Appendix A, exactly: one request, γ = 2, target (0.7, 0.3), draft (0.5, 0.5),
   c_1 = 0.8, c_2 depending on the sampled d_1, SPS(1, 2, 3) = (1.0, 0.5, 0.45). The search over
   every stopping point verifies d_1 only when d_1 turned out to be the token the target likes,
   which turns (0.7, 0.3) into (0.85, 0.15); ``prefix`` and ``async`` keep (0.7, 0.3).
2. The same by Monte Carlo through the platform's rejection sampler.
3. Chi-square through the real engine on a six-token target, with a drafter whose confidences
   reveal its previous token (as DSpark's do, through the Markov embedding), for unseeded
   requests (chain rejection sampling): ``prefix`` and ``async`` (under a budget) pass, the unsafe
   search is caught (negative control). Seeded requests (matching under position-keyed noise)
   stay exact even under the unsafe search.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from _mocks import MockDrafter
from dspark.drafter_service.base import DraftBlock
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.sampling import rejection_sample
from dspark.platform.target.loading import FrozenTarget
from dspark.scheduler.async_prefix import AsyncPrefixPolicy, global_capacity, top_k_lengths
from dspark.scheduler.policies import BatchView, survival
from dspark.scheduler.prefix import PrefixPolicy
from dspark.scheduler.sps import SPSProfile
from dspark.verifier_service.engine import VerifierEngine

# ------------------------------------------------------------------ Appendix A

P_T = np.array([0.7, 0.3])  # target over {A, B}
P_D = np.array([0.5, 0.5])  # draft
C1 = 0.8  # = Σ min(p_t, p_d): calibrated
C2 = {0: 0.9, 1: 0.1}  # c_2 after d_1 = A / d_1 = B: the confidence of slot 2 sees d_1
APPENDIX_A = SPSProfile.from_points([(1, 1.0), (2, 0.5), (3, 0.45)])


def appendix_view(d1: int) -> BatchView:
    return BatchView(np.array([[C1, C2[d1]]]), 2, ("r",))


def unsafe_global(view: BatchView, sps) -> list[int]:
    """The search over every stopping point on the current survivals (no early break)."""
    a, lim = survival(view.confidences), view.limits()
    return top_k_lengths(a, lim, global_capacity(a, lim, sps, view.budget_tokens))


def first_token_distribution(decide) -> np.ndarray:
    """Exact law of the first emitted token when ``decide(view) -> [ℓ]`` is asked after d_1 is drawn."""
    residual = np.maximum(P_T - P_D, 0.0)
    residual /= residual.sum()
    out = np.zeros(2)
    for d1 in (0, 1):
        if decide(appendix_view(d1))[0] >= 1:  # d_1 verified: accept w.p. min(1, p/q), else residual
            acc = min(1.0, P_T[d1] / P_D[d1])
            out[d1] += P_D[d1] * acc
            out += P_D[d1] * (1.0 - acc) * residual
        else:  # not verified: the target samples the token itself
            out += P_D[d1] * P_T
    return out


def test_appendix_a_setup_is_calibrated():
    assert np.minimum(P_T, P_D).sum() == pytest.approx(C1)


def test_global_search_turns_07_03_into_085_015():
    assert unsafe_global(appendix_view(0), APPENDIX_A) == [2]  # Θ(2) = (1.8 + 0.72)·0.45 = 1.134 > 1
    assert unsafe_global(appendix_view(1), APPENDIX_A) == [0]  # Θ(2) = (1.8 + 0.08)·0.45 = 0.846 < 1
    assert np.allclose(first_token_distribution(lambda v: unsafe_global(v, APPENDIX_A)), [0.85, 0.15])


def test_prefix_keeps_appendix_a_exact():
    assert np.allclose(first_token_distribution(PrefixPolicy(APPENDIX_A).choose), P_T)


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize("stale_c2", [0.05, 0.5, 0.95])
def test_async_keeps_appendix_a_exact_whatever_its_history(lag, stale_c2):
    def decide(view):
        pol = AsyncPrefixPolicy(APPENDIX_A, lag=lag)
        for _ in range(lag):  # the same history whichever d_1 this step drew
            pol.choose(BatchView(np.array([[C1, stale_c2]]), 2, ("r",)))
        ell = pol.choose(view)
        assert pol.last_capacity is not None  # sized from the history, not at start-up
        return ell

    assert np.allclose(first_token_distribution(decide), P_T)


def test_monte_carlo_through_the_rejection_sampler():
    """Many independent copies of Appendix A's request in one batch of the platform's sampler."""
    n = 100_000
    g = torch.Generator().manual_seed(0)
    d = torch.multinomial(torch.tensor(P_D), 2 * n, replacement=True, generator=g).view(n, 2)  # [n, 2] d_1, d_2

    def emitted_a_rate(decide) -> float:
        ell_of = {d1: decide(appendix_view(d1))[0] for d1 in (0, 1)}
        lengths = torch.tensor([ell_of[int(x)] for x in d[:, 0]])  # [n]
        cu = torch.zeros(n + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(lengths, 0)
        draft_tokens = d[torch.arange(2)[None, :] < lengths[:, None]]  # [D] row by row: each request's d_1..d_ℓ
        D = int(cu[-1])
        draft_probs = torch.tensor(P_D, dtype=torch.float32).expand(D, 2)
        target_probs = torch.tensor(P_T, dtype=torch.float32).expand(D + n, 2)  # the toy target is the same at every slot
        uniforms = torch.rand(D, generator=g)
        noise = torch.empty(n, 2).exponential_(generator=g)
        _, out = rejection_sample(draft_tokens, draft_probs, target_probs, cu, uniforms, noise)
        return float((out[:, 0] == 0).float().mean())

    se = (0.85 * 0.15 / n) ** 0.5
    assert abs(emitted_a_rate(lambda v: unsafe_global(v, APPENDIX_A)) - 0.85) < 5 * se
    assert abs(emitted_a_rate(PrefixPolicy(APPENDIX_A).choose) - 0.70) < 5 * se
    assert abs(emitted_a_rate(lambda v: [2]) - 0.70) < 5 * se  # any length fixed in advance is exact


# ------------------------------------------------------------------ through the engine

V = 6
PROMPT = (1, 2, 3)
N = 2000  # requests per engine test
SIGNAL = torch.tensor([0, 1, 2])  # tokens after which the drafter is confident


@pytest.fixture(scope="module")
def six_token_target():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=64, eos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # conditionals clearly different per context, none of them near one-hot
        model.lm_head.weight.mul_(3.0)
    return FrozenTarget(model, layer_ids=(0, 1))


class SignalDrafter(MockDrafter):
    """MockDrafter's unrelated Markov chain, with confidences that reveal the previous token:
    c_1 = 0.8 or 0.7 by the anchor, c_{k+1} = 0.97 if d_k is a SIGNAL token, else 0.03. A rule
    that reads c_{k+1} to decide about d_k therefore decides by d_k's own value."""

    def propose(self, slots, anchors, positions, sampling) -> DraftBlock:
        block = super().propose(slots, anchors, positions, sampling)
        conf = torch.empty(block.tokens.shape)
        conf[:, 0] = torch.where(torch.isin(anchors, SIGNAL), 0.8, 0.7)
        conf[:, 1:] = torch.where(torch.isin(block.tokens[:, :-1], SIGNAL), 0.97, 0.03)
        return DraftBlock(block.tokens, block.logits, conf)


class PerRequestGlobalSearch:
    """Negative control: Appendix A's search for each request on its own (R = 1 each)."""

    sps = SPSProfile.from_points([(1, 1.0), (2, 0.5), (3, 0.45), (4, 0.40)])

    def choose(self, view: BatchView) -> list[int]:
        return [unsafe_global(BatchView(view.confidences[i : i + 1], view.gamma, (rid,), None, (int(view.limits()[i]),)),
                              self.sps)[0] for i, rid in enumerate(view.request_ids)]


# a batch curve with a fixed cost per step: the policies verify some drafts and skip others
BATCH_SPS = SPSProfile.from_points([(b, 1.0 / (100.0 + b)) for b in range(1, 520)])


def exact_pair_distribution(t: FrozenTarget) -> torch.Tensor:
    """[V*V] exact P(x2, x3) after PROMPT at T = 1, marginalising x1."""
    def probs(seqs):
        return torch.softmax(t(torch.tensor(seqs)).logits[:, -1].float(), -1)

    p1 = probs([list(PROMPT)])[0]  # [V]
    p2 = probs([list(PROMPT) + [a] for a in range(V)])  # [V, V]
    p3 = probs([list(PROMPT) + [a, b] for a, b in itertools.product(range(V), range(V))]).view(V, V, V)
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0).reshape(-1)


def run_engine(t, policy, n: int, budget: int | None = None, seeded: bool = False):
    """n requests of 4 tokens (the first verify step may check 2 drafts); counts of (x2, x3) and
    every step's record. Unseeded requests go through chain rejection sampling, where the choice
    of verify lengths matters; seeded ones are verified by matching (position-keyed noise)."""
    # drafter seed 2: its chain differs from the target enough that the unsafe rule's bias on x2
    # is large (noncentrality ≈ 140 at n = 2000), so the negative control is far from chance
    eng = VerifierEngine(t, SignalDrafter(V, 3, seed=2), policy, max_batch_size=128)
    eng.verify_budget = budget
    records = []
    eng.add_observer(records.append)
    reqs = [GenerationRequest(str(i), PROMPT, SamplingParams(max_tokens=4, temperature=1.0, seed=i if seeded else None,
                                                              ignore_eos=True))
            for i in range(n)]
    counts = torch.zeros(V * V)
    for o in eng.generate(reqs).values():
        counts[o.token_ids[1] * V + o.token_ids[2]] += 1
    return counts, records


def chi2_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    exp = expected / expected.sum() * counts.sum()
    return chisquare(counts.numpy(), exp.numpy()).pvalue


def p_values(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Chi-square p-values of the (x2, x3) pairs and of x2 alone (the token a scheduler decides
    about first, where an anticipating rule's bias is concentrated: more power with 5 dof)."""
    return chi2_p(counts, expected), chi2_p(counts.view(V, V).sum(1), expected.view(V, V).sum(1))


def length_histogram(records) -> np.ndarray:
    return np.bincount(np.concatenate([r.lengths for r in records]), minlength=4)


def test_prefix_through_the_engine_matches_the_target(six_token_target):
    counts, records = run_engine(six_token_target, PrefixPolicy(BATCH_SPS), N)
    hist = length_histogram(records)
    assert min(hist[:3]) > 150, hist  # the policy really chose 0, 1 and 2 drafts, often
    assert min(p_values(counts, exact_pair_distribution(six_token_target))) > 1e-3


def test_async_under_a_budget_through_the_engine_matches_the_target(six_token_target):
    pol = AsyncPrefixPolicy(BATCH_SPS, lag=2)
    counts, records = run_engine(six_token_target, pol, N, budget=48)
    hist = length_histogram(records)
    assert min(hist[:3]) > 150, hist
    assert all(sum(r.lengths) <= 48 for r in records)
    assert pol.cold_steps == 2 and len(records) > 20  # the capacity path decided all but two steps
    assert min(p_values(counts, exact_pair_distribution(six_token_target))) > 1e-3


def test_the_engine_test_catches_the_global_search(six_token_target):
    counts, records = run_engine(six_token_target, PerRequestGlobalSearch(), N)
    assert length_histogram(records)[2] > 300
    assert max(p_values(counts, exact_pair_distribution(six_token_target))) < 1e-6


def test_matching_makes_even_the_global_search_exact_for_seeded_requests(six_token_target):
    """Seeded requests emit the target's own token under E(seed, n) at every position, whatever
    was verified, so a verify-length rule cannot bias them, even one that reads the drafts."""
    counts, records = run_engine(six_token_target, PerRequestGlobalSearch(), N, seeded=True)
    assert length_histogram(records)[2] > 300
    assert min(p_values(counts, exact_pair_distribution(six_token_target))) > 1e-3
