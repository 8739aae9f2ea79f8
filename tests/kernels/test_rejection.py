"""The Triton rejection kernels against :mod:`dspark.platform.sampling` (interpreter on CPU).

Sampling outputs must be ``torch.equal`` given the same uniforms and noise: ragged batches with
empty requests, vocabulary tile edges (small tiles so V = BLOCK−1, BLOCK, BLOCK+1 stay cheap, and
the real 151936), every acceptance regime, half-precision and strided inputs, the dispatch hooks
in ``sampling``; then seeded determinism and the emitted-token distribution.
"""

from __future__ import annotations

import pytest
import torch

from dspark.kernels import dispatch
from dspark.kernels.rejection import (
    greedy_verify,
    greedy_verify_triton,
    reference,
    rejection_sample,
    rejection_sample_triton,
)
from dspark.platform import sampling

pytestmark = pytest.mark.usefixtures("interpreted")

BLOCK = 32  # vocabulary tile used for the tile-edge cases


def cu_of(lengths) -> torch.Tensor:  # [R+1]
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def ragged_case(lengths, vocab, seed=0, sharp=2.0, agree=0.5):
    """Random p_t / p_d rows, drafts from p_d, uniforms and noise for a ragged batch."""
    g = torch.Generator().manual_seed(seed)
    r, d = len(lengths), int(sum(lengths))
    p_t = torch.softmax(torch.randn(d + r, vocab, generator=g) * sharp, -1)
    p_d = torch.softmax(torch.randn(d, vocab, generator=g) * sharp, -1)
    # bring part of p_d close to its target row so long accepted prefixes occur
    rows = torch.arange(d) + torch.repeat_interleave(torch.arange(r), torch.as_tensor(lengths, dtype=torch.int64))
    mix = (torch.rand(d, 1, generator=g) < agree).float()
    p_d = mix * (0.9 * p_t[rows] + 0.1 * p_d) + (1 - mix) * p_d
    drafts = torch.multinomial(p_d, 1, generator=g).squeeze(1) if d else torch.zeros(0, dtype=torch.int64)
    u = torch.rand(d, generator=g)
    e = torch.empty(r, vocab).exponential_(generator=g)
    return drafts, p_d, p_t, cu_of(lengths), u, e


def assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert torch.equal(a[1], b[1]), (a[1], b[1])


# ==== equality with the reference ====


@pytest.mark.parametrize("vocab", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("lengths", [[3, 0, 5, 1, 2], [0], [0, 0], [4], [1, 0, 0, 17, 2, 0]])
def test_rejection_sample_equals_reference(vocab, lengths):
    case = ragged_case(lengths, vocab, seed=vocab * 31 + len(lengths))
    assert_same(rejection_sample_triton(*case, block_v=BLOCK), reference.rejection_sample(*case))


def test_empty_batch():
    case = ragged_case([], 9)
    out = rejection_sample_triton(*case, block_v=BLOCK)
    assert out[0].shape == (0,) and out[1].shape == (0, 1)
    assert_same(out, reference.rejection_sample(*case))
    assert_same(greedy_verify_triton(case[0], torch.zeros(0, dtype=torch.int64), case[3]),
                reference.greedy_verify(case[0], torch.zeros(0, dtype=torch.int64), case[3]))


@pytest.mark.parametrize("seed", range(6))
def test_random_ragged_batches(seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(0, 7, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
    vocab = int(torch.randint(2, 3 * BLOCK, (1,), generator=g))
    case = ragged_case(lengths, vocab, seed=seed, sharp=float(torch.rand(1, generator=g)) * 4, agree=0.8)
    assert_same(rejection_sample_triton(*case, block_v=BLOCK), reference.rejection_sample(*case))


def test_every_acceptance_regime():
    lengths = [3, 2, 4, 0, 1]
    drafts, p_d, p_t, cu, u, e = ragged_case(lengths, 40, seed=3)
    for uniforms in (torch.zeros_like(u), torch.full_like(u, 0.999999), u):  # accept all / reject early / mixed
        case = (drafts, p_d, p_t, cu, uniforms, e)
        assert_same(rejection_sample_triton(*case, block_v=BLOCK), reference.rejection_sample(*case))
    # zero residual (p_d ≥ p_t everywhere): the recovered token falls back to p_t
    p_t0 = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]])
    case = (torch.tensor([1]), 2 * p_t0[:1], p_t0, cu_of([1]), torch.tensor([0.9]), torch.tensor([[0.1, 1.0, 0.5, 0.1]]))
    out = rejection_sample_triton(*case, block_v=2)
    assert out[0].tolist() == [0] and out[1].tolist() == [[2, -1]]
    assert_same(out, reference.rejection_sample(*case))
    # p_d(d) = 0 (accepted iff p_t > 0), p_t(d) = 0 (never accepted), exact ties in the race
    p_d = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    p_t = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    case = (torch.tensor([0, 1]), p_d, p_t, cu_of([2]), torch.tensor([0.5, 0.5]), torch.ones(1, 3))
    assert_same(rejection_sample_triton(*case, block_v=2), reference.rejection_sample(*case))


def test_one_hot_rows_equal_greedy_verify():
    g = torch.Generator().manual_seed(5)
    lengths, vocab = [3, 0, 4, 2], 33
    r, d = len(lengths), sum(lengths)
    tgt_logits = torch.randint(0, 4, (d + r, vocab), generator=g).float()  # ties exercise the first-index rule
    rows = torch.arange(d) + torch.repeat_interleave(torch.arange(r), torch.tensor(lengths))
    drafts = torch.where(torch.rand(d, generator=g) < 0.7, tgt_logits[rows].argmax(-1), torch.randint(0, vocab, (d,), generator=g))
    zero = torch.zeros(d + r)
    p_t = sampling.logits_to_probs(tgt_logits, zero, zero.long(), torch.ones(d + r))
    p_d = torch.nn.functional.one_hot(drafts, vocab).float()
    e = torch.empty(r, vocab).exponential_(generator=g)
    out = rejection_sample_triton(drafts, p_d, p_t, cu_of(lengths), torch.rand(d, generator=g), e, block_v=BLOCK)
    assert_same(out, greedy_verify_triton(drafts, tgt_logits.argmax(-1), cu_of(lengths)))


@pytest.mark.parametrize("lengths", [[3, 0, 5, 1, 2], [0, 0, 0], [20, 1], [0]])
def test_greedy_verify_equals_reference(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    r, d = len(lengths), sum(lengths)
    target = torch.randint(0, 5, (d + r,), generator=g)
    rows = torch.arange(d) + torch.repeat_interleave(torch.arange(r), torch.tensor(lengths, dtype=torch.int64))
    drafts = torch.where(torch.rand(d, generator=g) < 0.8, target[rows], torch.randint(0, 5, (d,), generator=g))
    assert_same(greedy_verify_triton(drafts, target, cu_of(lengths)), reference.greedy_verify(drafts, target, cu_of(lengths)))


def test_real_vocab_size():
    case = ragged_case([2, 0, 3], 151936, seed=1, sharp=6.0)
    assert_same(rejection_sample_triton(*case), reference.rejection_sample(*case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probs_read_in_place(dtype):
    drafts, p_d, p_t, cu, u, e = ragged_case([3, 1, 0, 2], 45, seed=8)
    case = (drafts, p_d.to(dtype), p_t.to(dtype), cu, u, e)
    assert_same(rejection_sample_triton(*case, block_v=BLOCK), reference.rejection_sample(*case))


def test_strided_inputs():
    """Column slices of wider buffers (row stride ≠ V) and a transposed noise tensor."""
    drafts, p_d, p_t, cu, u, e = ragged_case([2, 3, 0], 37, seed=9)
    wide_d = torch.zeros(p_d.shape[0], 50)
    wide_d[:, 5:42] = p_d
    wide_t = torch.zeros(p_t.shape[0], 60)
    wide_t[:, 11:48] = p_t
    e_t = e.t().contiguous().t()
    case = (drafts, wide_d[:, 5:42], wide_t[:, 11:48], cu, u, e_t)
    assert not case[1].is_contiguous() and not case[5].is_contiguous()
    assert_same(rejection_sample_triton(*case, block_v=BLOCK), reference.rejection_sample(*case))


def test_shape_errors_match_the_reference():
    drafts, p_d, p_t, cu, u, e = ragged_case([2, 1], 9)
    bad = [
        (drafts, p_d, p_t, torch.tensor([0, 2, 4]), u, e),  # cu ends past D
        (drafts, p_d, p_t[:-1], cu, u, e),
        (drafts, p_d[:, :-1], p_t, cu, u, e),
        (drafts, p_d, p_t, cu, u[:-1], e),
        (drafts, p_d, p_t, cu, u, e[:, :-1]),
        (drafts[:, None], p_d, p_t, cu, u, e),
    ]
    for args in bad:
        with pytest.raises(ValueError) as ref_err:
            reference.rejection_sample(*args)
        with pytest.raises(ValueError) as tri_err:
            rejection_sample_triton(*args)
        assert str(tri_err.value) == str(ref_err.value)


# ==== dispatch and the hooks in dspark.platform.sampling ====


def test_entry_points_and_sampling_hooks_follow_the_dispatcher(monkeypatch):
    case = ragged_case([3, 0, 2], 20, seed=4)
    want = reference.rejection_sample(*case)
    drafts, cu, target = case[0], case[3], case[2].argmax(-1)
    want_g = reference.greedy_verify(drafts, target, cu)
    calls = []  # which fast paths ran (sampling imports them from the package at call time)
    import dspark.kernels.rejection as rej

    orig_rs, orig_gv = rej.rejection_sample_triton, rej.greedy_verify_triton
    monkeypatch.setattr(rej, "rejection_sample_triton", lambda *a, **k: calls.append("rs") or orig_rs(*a, **k))
    monkeypatch.setattr(rej, "greedy_verify_triton", lambda *a, **k: calls.append("gv") or orig_gv(*a, **k))
    with dispatch.override("triton"):
        assert_same(sampling.rejection_sample(*case), want)
        assert_same(sampling.greedy_verify(drafts, target, cu), want_g)
        assert_same(rejection_sample(*case), want)
        assert_same(greedy_verify(drafts, target, cu), want_g)
    assert calls == ["rs", "gv", "rs", "gv"]
    calls.clear()
    # the default (auto) on CPU tensors is the reference, even under the interpreter
    assert_same(sampling.rejection_sample(*case), want)
    assert_same(rejection_sample(*case), want)
    assert calls == []


# ==== stochastic behaviour ====


def test_seeded_requests_are_deterministic():
    """Seeded generators give the same tokens twice, whatever else shares the batch."""
    drafts, p_d, p_t, cu, _, _ = ragged_case([3, 2, 4], 25, seed=12)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        u = sampling.draw_uniforms(gens, [3, 2, 4])
        e = sampling.draw_exponentials(gens, 25)
        with dispatch.override("triton"):
            return sampling.rejection_sample(drafts, p_d, p_t, cu, u, e)

    a, b = run([1, 2, 3]), run([1, 2, 3])
    assert_same(a, b)
    c = run([1, 99, 3])  # request 1's generator changes: requests 0 and 2 keep their tokens
    for i in (0, 2):
        assert torch.equal(a[1][i], c[1][i]) and a[0][i] == c[0][i]


def chisquare_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit (cells with expected count < 5 pooled), p-value from the regularised
    upper incomplete gamma function Q(df/2, stat/2)."""
    probs = probs.double()
    obs = torch.bincount(samples, minlength=probs.numel()).double()
    if (obs[probs == 0] > 0).any():
        return 0.0
    exp = probs * obs.sum()
    keep = exp >= 5
    o = torch.cat([obs[keep], obs[~keep & (probs > 0)].sum()[None]])
    e = torch.cat([exp[keep], exp[~keep & (probs > 0)].sum()[None]])
    o, e = o[e > 0], e[e > 0]
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((o.numel() - 1) / 2, dtype=torch.float64), stat / 2))


def test_emitted_token_follows_the_target_distribution():
    """Each of N requests drafts 2 tokens from a p_d far from p_t; the first emitted token (an
    accepted draft or the recovered one) must be distributed as p_t."""
    g = torch.Generator().manual_seed(21)
    n, vocab = 400, 6  # the interpreter runs ~100 programs a second
    pt_row = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.2, 0.1])
    pd_row = torch.tensor([0.3, 0.05, 0.2, 0.05, 0.1, 0.3])
    drafts = torch.multinomial(pd_row, 2 * n, replacement=True, generator=g)
    p_d = pd_row.expand(2 * n, vocab)  # stride-0 rows: read in place, nothing copied
    p_t = pt_row.expand(3 * n, vocab)
    u = torch.rand(2 * n, generator=g)
    e = torch.empty(n, vocab).exponential_(generator=g)
    _, out = rejection_sample_triton(drafts, p_d, p_t, cu_of([2] * n), u, e)
    first = out[:, 0]
    assert chisquare_pvalue(first, pt_row) > 1e-3
    # negative control: the draft distribution is rejected by the same test
    assert chisquare_pvalue(drafts[::2], pt_row) < 1e-6
