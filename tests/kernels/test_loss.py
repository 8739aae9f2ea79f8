"""The fused loss kernels against ``objective.loss_terms``: values, and gradients against autograd.

Vocabulary tile edges with a small tile, empty and full evaluation masks, each term's gradient
on its own (the other upstream gradients None), bf16 logits, the real vocabulary size, and the
hook through ``loss_parts`` / ``finalize`` as training runs it.
"""

from __future__ import annotations

import pytest
import torch

from dspark.kernels import dispatch
from dspark.kernels.loss import loss_terms, loss_terms_triton, reference
from dspark.platform.training import objective

pytestmark = pytest.mark.usefixtures("interpreted")

BLOCK = 32


def make_case(shape=(2, 3, 4), vocab=37, seed=0, keep=0.7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * scale
    p_t = torch.softmax(torch.randn(*shape, vocab, generator=g) * 2, -1)
    labels = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) < keep
    return logits, p_t, labels, mask


def values_and_grad(fn, case, weights=(1.0, 1.0, 1.0), seed=1):
    """Terms of ``fn`` and ∂(Σ_i Σ_n c_i[n]·term_i[n])/∂logits with random c (None-weighted terms left out)."""
    logits, p_t, labels, mask = case
    leaf = logits.clone().requires_grad_()
    terms = fn(leaf, p_t, labels, mask)
    g = torch.Generator().manual_seed(seed)
    total = sum((torch.randn(t.shape, generator=g) * w * t).sum() for t, w in zip(terms, weights) if w)
    total.backward()
    return [t.detach() for t in terms], leaf.grad


def assert_matches_reference(case, block_v=BLOCK, weights=(1.0, 1.0, 1.0), tol=None):
    tol = tol or {"rtol": 1e-5, "atol": 1e-5}
    got, g_got = values_and_grad(lambda *a: loss_terms_triton(*a, block_v=block_v), case, weights)
    want, g_want = values_and_grad(reference.loss_terms, case, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(g_got, g_want, **tol)


@pytest.mark.parametrize("vocab", [1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3])
def test_values_and_gradient_at_tile_edges(vocab):
    assert_matches_reference(make_case(vocab=vocab, seed=vocab))


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.1, 0.9, 0.0)])
def test_each_term_gradient_alone(weights):
    assert_matches_reference(make_case(seed=3), weights=weights)


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_empty_and_full_masks(keep):
    case = make_case(seed=4, keep=keep)
    if keep:
        assert_matches_reference(case)
    else:  # nothing evaluated: empty terms, and a zero gradient once they are summed
        leaf = case[0].clone().requires_grad_()
        terms = loss_terms_triton(leaf, *case[1:], block_v=BLOCK)
        assert all(t.shape == (0,) for t in terms)
        sum(t.sum() for t in terms).backward()
        assert leaf.grad is None or not leaf.grad.any()


def test_sharp_distributions_and_ties_at_p_equal_t():
    """One-hot-like logits (p underflows to 0 outside the argmax) and rows where p_d = p_t exactly
    in some entries (|p − t| has gradient 0 there, as torch's abs)."""
    logits, p_t, labels, mask = make_case(vocab=40, seed=5, scale=30.0)
    p_t = p_t.clone()
    p_t[0, 0, 0] = torch.softmax(logits[0, 0, 0], -1)  # identical row: L1 = 0
    mask[0, 0, 0] = True
    assert_matches_reference((logits, p_t, labels, mask), tol={"rtol": 1e-5, "atol": 2e-5})


def test_bf16_logits():
    logits, p_t, labels, mask = make_case(vocab=45, seed=6)
    case = (logits.bfloat16().float(), p_t, labels, mask)  # values representable in bf16 ...
    got = loss_terms_triton(case[0].bfloat16(), p_t, labels, mask, block_v=BLOCK)  # ... read as bf16
    for a, b in zip(got, reference.loss_terms(*case)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_real_vocab_size():
    assert_matches_reference(make_case(shape=(1, 1, 3), vocab=151936, seed=7, keep=1.0), block_v=None,
                             tol={"rtol": 1e-4, "atol": 1e-4})


def test_target_requiring_grad_takes_the_reference():
    logits, p_t, labels, mask = make_case(seed=8)
    p_t = p_t.clone().requires_grad_()
    with dispatch.override("triton"):
        terms = loss_terms(logits.requires_grad_(), p_t, labels, mask)
    sum(t.sum() for t in terms).backward()
    assert p_t.grad is not None  # only autograd of the reference gives p_t a gradient


def test_loss_parts_hook_gives_the_same_loss_and_gradient():
    logits, p_t, labels, mask = make_case(shape=(2, 3, 5), vocab=50, seed=9)
    conf = torch.randn(2, 3, 5)
    weights = objective.KIND_DEFAULTS["dspark"]

    def run(mode):
        leaf = logits.clone().requires_grad_()
        c = conf.clone().requires_grad_()
        with dispatch.override(mode):
            parts = objective.loss_parts(leaf, p_t, labels, mask, c, weights.decay)
        loss, values = objective.finalize(parts, objective.LossWeights(0.3, 0.9, 0.2, 1.0, 4.0, False))
        loss.backward()
        return parts.num.detach(), parts.den, leaf.grad, c.grad

    for a, b in zip(run("triton"), run("reference")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # auto on CPU is the reference itself, bit for bit
    for a, b in zip(run("auto"), run("reference")):
        assert torch.equal(a, b)
