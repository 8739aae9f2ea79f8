"""Position-keyed noise E(key, n) (``platform.sampling.keyed_exponentials``) and how
``SamplingBatch`` hands it out: bit-exact against a pure-Python splitmix64, Exp(1) and independent
across keys and positions, and only keyed rows (seeded, sampled) use it."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.platform.sampling import SamplingBatch, draw_exponentials, draw_uniforms, keyed_exponentials, row_seeds

M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def fmix(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def python_reference(key: int, n: int, vocab: int) -> list[float]:
    """The documented construction, in Python integers: splitmix64 stream of the row seed."""
    row = fmix(fmix(key + G) + (n + 1) * G)
    return [-math.log1p(-((fmix(row + (v + 1) * G) >> 11) / 2**53)) for v in range(vocab)]


@pytest.mark.parametrize("vocab", [1, 7, 13])
def test_keyed_noise_matches_pure_python_splitmix64(vocab):
    cases = [(0, 0), (1, 0), (0, 1), (2**63 - 1, 5), (2**64 - 1, 3), (12345, 10**12), (987654321987, 77)]
    got = keyed_exponentials([k for k, _ in cases], [n for _, n in cases], vocab)  # [N, V]
    assert got.shape == (len(cases), vocab) and got.dtype == torch.float32
    for i, (k, n) in enumerate(cases):
        assert torch.equal(got[i], torch.tensor(python_reference(k, n, vocab), dtype=torch.float64).float()), (k, n)
    # keys are taken mod 2**64: -1 and 2**64 - 1 are the same key
    assert torch.equal(keyed_exponentials([-1], [3], vocab), got[4:5])


def test_keyed_noise_is_exp1_and_independent_across_keys_and_positions():
    keys = torch.arange(400).repeat_interleave(5).tolist()  # 400 keys x 5 positions
    pos = list(range(5)) * 400
    e = keyed_exponentials(keys, pos, 997).double()  # [2000, 997]
    flat = e.flatten().sort().values
    n = flat.numel()
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - (1 - torch.exp(-flat))).abs().max()
    assert ks < 1.63 / math.sqrt(n), float(ks)  # Kolmogorov-Smirnov at p = 0.01
    assert abs(float(e.mean()) - 1) < 0.01 and abs(float(e.var()) - 1) < 0.03
    rows = e.view(400, 5, 997)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert abs(corr(rows[:, 0], rows[:, 1])) < 0.01  # neighbouring positions of one key
    assert abs(corr(rows[:-1, 2], rows[1:, 2])) < 0.01  # neighbouring keys at one position
    assert abs(corr(rows[:, 3, :-1], rows[:, 3, 1:])) < 0.01  # neighbouring vocabulary entries


def test_race_with_keyed_noise_samples_the_distribution():
    """argmax(p / E(key, n)) over many keys is an exact draw from p (chi-square)."""
    from scipy.stats import chisquare

    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    e = keyed_exponentials(list(range(20000)), [9] * 20000, 6)
    from dspark.platform.sampling import sample_from_probs

    x = sample_from_probs(p.expand(20000, 6), e)
    counts = torch.bincount(x, minlength=6).double()
    assert counts[5] == 0
    assert chisquare(counts[:5].numpy(), (p[:5] * 20000).double().numpy()).pvalue > 1e-3


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sampling_batch_hands_keyed_noise_to_seeded_sampled_rows_only():
    # rows: keyed sampled, unkeyed sampled, keyed but greedy (no noise needed: unkeyed), keyed sampled
    b = SamplingBatch(torch.tensor([0.8, 1.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.int64), torch.ones(4),
                      gens(1, 2, 3, 4), keys=[11, None, 12, 13], offsets=[5, 0, 2, 0])
    assert b.keyed == [True, False, False, True]
    e = b.exponentials(9, step=2)
    assert torch.equal(e[0], keyed_exponentials([11], [7], 9)[0])
    assert torch.equal(e[3], keyed_exponentials([13], [2], 9)[0])
    assert torch.equal(e[1], draw_exponentials(gens(2), 9)[0]) and torch.equal(e[2], draw_exponentials(gens(3), 9)[0])
    # keyed rows leave their generators alone; unkeyed ones advanced by one draw of V
    g1, g2 = b.generators[0], b.generators[1]
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=gens(1)[0]))
    ref = gens(2)[0]
    torch.empty(9).exponential_(generator=ref)
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=ref))
    # uniforms: zeros for keyed rows, generator draws for the others
    b = SamplingBatch(torch.tensor([0.8, 1.0]), torch.zeros(2, dtype=torch.int64), torch.ones(2), gens(1, 2),
                      keys=[11, None])
    u = b.uniforms([2, 3])
    assert torch.equal(u[:2], torch.zeros(2)) and torch.equal(u[2:], draw_uniforms(gens(2), [3]))
    assert row_seeds(SamplingBatch(torch.tensor([0.8, 1.0]), torch.zeros(2, dtype=torch.int64), torch.ones(2),
                                   gens(1, 2), keys=[11, None]))[0] is None


def test_repeat_interleave_and_select_carry_keys_and_positions():
    b = SamplingBatch.from_params([(1.0, 0, 1.0), (0.5, 3, 0.9)], gens(1, 2), keys=[7, None], offsets=[10, 4])
    r = b.repeat_interleave(torch.tensor([3, 2]))
    assert r.keys == [7, 7, 7, None, None] and r.offsets == [10, 11, 12, 4, 5]
    # row j of a repeated batch draws E(key, offset + j): the verifier's rows match the drafter's slots
    assert torch.equal(r.exponentials(5)[:3], torch.stack([b.select([0]).exponentials(5, step=k)[0] for k in range(3)]))
    s = b.select([1, 0])
    assert s.keys == [None, 7] and s.offsets == [4, 10]
    with pytest.raises(ValueError, match="keys/offsets"):
        SamplingBatch(torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2), gens(1, 2), keys=[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keyed_noise_is_the_same_on_cuda():
    cpu = keyed_exponentials(list(range(64)), list(range(64)), 50_000)
    gpu = keyed_exponentials(list(range(64)), list(range(64)), 50_000, device="cuda")
    # the integer stream is identical; -log1p in float64 may differ in the last float64 bit only
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=0)
