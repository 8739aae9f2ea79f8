"""The Triton Markov block sampler against its reference and against ``DSparkDrafter.sample_block``.

Tokens must be ``torch.equal`` given the same noise and the logits ``assert_close`` (the rank-r
bias is a dot product summed in another order). Cases: greedy and sampled rows mixed, vocabulary
tile edges, odd ranks, no head (DFlash), bf16 weights, γ = 1, the real vocabulary size; then the
drafter hook: same block, same confidences, generators advanced alike, and the fallbacks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.drafter_service.markov import ConfidenceHead, build_markov_head
from dspark.drafter_service.providers import TargetBoundDrafter
from dspark.drafter_service.providers.dspark import DSparkDrafter
from dspark.kernels import dispatch
from dspark.kernels.markov import markov_sample, markov_sample_triton, reference, sample_block_fast
from dspark.platform.sampling import SamplingBatch

pytestmark = pytest.mark.usefixtures("interpreted")


def make_case(r=4, gamma=5, vocab=37, rank=6, seed=0, temps=(0.0, 1.0, 0.7, 1.3), wdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(r, gamma, vocab, generator=g) * 2
    anchors = torch.randint(0, vocab, (r,), generator=g)
    w1 = (torch.randn(vocab, rank, generator=g)).to(wdtype) if rank else None
    w2 = (torch.randn(vocab, rank, generator=g) * 0.6).to(wdtype) if rank else None
    temp = torch.tensor([temps[i % len(temps)] for i in range(r)], dtype=torch.float32)
    noise = torch.empty(r, gamma, vocab).exponential_(generator=g)
    return base, anchors, w1, w2, temp, noise


def assert_match(got, want):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab,block_v", [(15, 16), (16, 16), (17, 16), (50, 16), (33, 64)])
@pytest.mark.parametrize("rank", [0, 1, 5, 8])
def test_equals_reference(vocab, block_v, rank):
    case = make_case(vocab=vocab, rank=rank, seed=vocab + 7 * rank)
    assert_match(markov_sample_triton(*case, block_v=block_v), reference.markov_sample(*case))


def test_worked_example_from_the_reference_docstring():
    base = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]])
    w1, w2 = torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([[0.0], [0.0], [5.0]])
    args = (base, torch.tensor([1]), w1, w2, torch.zeros(1), torch.ones(1, 2, 3))
    assert reference.markov_sample(*args)[0].tolist() == [[2, 1]]
    assert markov_sample_triton(*args)[0].tolist() == [[2, 1]]


@pytest.mark.parametrize("gamma", [1, 2, 7])
def test_block_sizes(gamma):
    case = make_case(r=3, gamma=gamma, vocab=40, rank=4, seed=gamma)
    assert_match(markov_sample_triton(*case, block_v=16), reference.markov_sample(*case))


def test_bf16_weights_round_the_bias_like_nn_linear():
    case = make_case(r=3, vocab=45, rank=7, seed=3, wdtype=torch.bfloat16)
    got, want = markov_sample_triton(*case, block_v=16), reference.markov_sample(*case)
    assert torch.equal(got[0], want[0])
    # the bias is rounded to bf16 after an fp32 sum in another order: at most one bf16 ulp apart
    ulp = 2.0 ** (torch.floor(torch.log2((want[1] - case[0]).abs().clamp_min(1e-30))) - 7)
    assert bool(((got[1] - want[1]).abs() <= ulp).all())
    assert not torch.equal(got[1], case[0])  # the bias is there


def test_strided_base_logits_and_noise():
    base, anchors, w1, w2, temp, noise = make_case(r=3, gamma=4, vocab=30, rank=3, seed=5)
    wide = torch.zeros(3, 4, 41)
    wide[..., 3:33] = base
    case = (wide[..., 3:33], anchors, w1, w2, temp, noise.transpose(0, 1).contiguous().transpose(0, 1))
    assert not case[0].is_contiguous() and not case[5].is_contiguous()
    assert_match(markov_sample_triton(*case, block_v=16), reference.markov_sample(*case))


def test_real_vocab_size():
    case = make_case(r=2, gamma=2, vocab=151936, rank=8, seed=11, temps=(0.0, 1.0))
    assert_match(markov_sample_triton(*case), reference.markov_sample(*case))


def test_dispatching_entry_point():
    case = make_case(r=2, gamma=3, vocab=20, rank=2, seed=1)
    want = reference.markov_sample(*case)
    with dispatch.override("triton"):
        assert_match(markov_sample(*case), want)
    got = markov_sample(*case)  # auto on CPU: the reference itself, bit for bit
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ==== the hook in DSparkDrafter.sample_block ====


class StubDrafter(nn.Module):
    """Just what ``DSparkDrafter.sample_block`` reads: the heads, γ and the STS temperatures."""

    sample_block = DSparkDrafter.sample_block
    calibrated_confidence = TargetBoundDrafter.calibrated_confidence

    def __init__(self, kind="vanilla", vocab=37, rank=6, hidden=16, gamma=5, confidence=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block_size = gamma
        self.markov = build_markov_head(kind, vocab, rank, hidden)
        if self.markov is not None:
            for p in self.markov.parameters():
                nn.init.normal_(p, std=0.5)
        self.confidence = ConfidenceHead(hidden, rank) if confidence else None
        self.register_buffer("confidence_temperature", torch.linspace(0.8, 1.5, gamma))


def seeded(r, temps, seed=123, top_k=0, top_p=1.0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(r)]
    return SamplingBatch.from_params([(temps[i % len(temps)], top_k, top_p) for i in range(r)], gens)


def block_inputs(r=4, gamma=5, vocab=37, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, gamma, hidden, generator=g), torch.randn(r, gamma, vocab, generator=g) * 2, torch.randint(0, vocab, (r,), generator=g)


@pytest.mark.parametrize("rank,confidence", [(6, True), (0, True), (3, False)])
def test_sample_block_fast_path_matches_the_loop(rank, confidence):
    drafter = StubDrafter(rank=rank, confidence=confidence)
    h, base, anchors = block_inputs()
    temps = (0.0, 1.0, 0.6)
    s_ref, s_fast = seeded(4, temps), seeded(4, temps)
    want = drafter.sample_block(h, base, anchors, s_ref)  # auto on CPU: the model's own loop
    with dispatch.override("triton"):
        assert sample_block_fast(base, anchors, drafter.markov, seeded(4, temps)) is not None
        got = drafter.sample_block(h, base, anchors, s_fast)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    if confidence:
        torch.testing.assert_close(got.confidences, want.confidences)
    else:
        assert got.confidences is None and want.confidences is None
    # every request's generator advanced by exactly the same draws
    for a, b in zip(s_ref.generators, s_fast.generators):
        assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


@pytest.mark.parametrize("kind", ["gated", "rnn"])
def test_other_heads_fall_back_to_the_loop(kind):
    drafter = StubDrafter(kind=kind)
    h, base, anchors = block_inputs()
    with dispatch.override("triton"):
        assert sample_block_fast(base, anchors, drafter.markov, seeded(4, (1.0,))) is None
        got = drafter.sample_block(h, base, anchors, seeded(4, (1.0,)))
    want = drafter.sample_block(h, base, anchors, seeded(4, (1.0,)))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.9)])
def test_top_k_top_p_fall_back_to_the_loop(top_k, top_p):
    drafter = StubDrafter()
    _, base, anchors = block_inputs()
    with dispatch.override("triton"):
        assert sample_block_fast(base, anchors, drafter.markov, seeded(4, (1.0,), top_k=top_k, top_p=top_p)) is None
        # top-k at or above V is off, as in apply_top_k_top_p: the kernel takes it
        assert sample_block_fast(base, anchors, drafter.markov, seeded(4, (1.0,), top_k=37)) is not None


def test_cpu_default_never_takes_the_fast_path():
    drafter = StubDrafter()
    _, base, anchors = block_inputs()
    assert sample_block_fast(base, anchors, drafter.markov, seeded(4, (1.0,))) is None
