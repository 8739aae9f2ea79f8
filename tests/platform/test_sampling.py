"""Tests of ``dspark.platform.sampling``: greedy verification, logit processing, chain speculative
sampling (exactness checked statistically against the target distribution), seeded determinism
and shape validation. CPU only, a few seconds in all.

scipy is not installed in this environment, so chi-square p-values come from the regularised
upper incomplete gamma function: ``p = Q(df/2, stat/2) = torch.special.gammaincc`` (float64),
checked below against tabulated critical values.
"""

from __future__ import annotations

import pytest
import torch

from dspark.platform.sampling import (
    SamplingBatch,
    apply_top_k_top_p,
    draw_exponentials,
    draw_uniforms,
    greedy_verify,
    logits_to_probs,
    rejection_sample,
    sample_from_probs,
)

NEG_INF = float("-inf")


def make_logits(tokens: list[int], vocab: int) -> torch.Tensor:  # [len(tokens), vocab]
    """One-hot-ish logits whose argmax is ``tokens``."""
    x = torch.randn(len(tokens), vocab, generator=torch.Generator().manual_seed(len(tokens))) * 0.1
    x[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.int64)] = 5.0
    return x


def cu_of(lengths: list[int] | torch.Tensor) -> torch.Tensor:  # [R+1]
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def params(n: int, t: float = 1.0, k: int = 0, p: float = 1.0):
    return torch.full((n,), t), torch.full((n,), k, dtype=torch.int64), torch.full((n,), p)


# ==== chi-square without scipy ====


def chisquare_pvalue(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of integer ``samples`` to the probabilities ``expected``.

    Cells with expected count < 5 are pooled into one cell; an observation in a cell of expected
    probability 0 is impossible under the null, so the p-value is 0.
    """
    expected = expected.double().flatten()
    obs = torch.bincount(samples.flatten(), minlength=expected.numel()).double()
    n = obs.sum()
    if (obs[expected == 0] > 0).any():
        return 0.0
    exp = expected * n
    keep = exp >= 5
    small = (exp > 0) & ~keep
    o, e = obs[keep], exp[keep]
    if small.any():
        o = torch.cat([o, obs[small].sum()[None]])
        e = torch.cat([e, exp[small].sum()[None]])
    stat = ((o - e) ** 2 / e).sum()
    df = o.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_chisquare_helper_matches_tables():
    # tabulated chi-square critical values at alpha = 1e-3: df=4 -> 18.467, df=24 -> 51.179
    for df, crit in ((4, 18.467), (24, 51.179)):
        p = torch.special.gammaincc(*torch.tensor([df / 2, crit / 2], dtype=torch.float64))
        assert abs(float(p) - 1e-3) < 2e-6
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    g = torch.Generator().manual_seed(0)
    assert chisquare_pvalue(torch.multinomial(probs, 20000, replacement=True, generator=g), probs) > 1e-3
    assert chisquare_pvalue(torch.multinomial(probs.flip(0)[1:], 20000, replacement=True, generator=g), probs) < 1e-6


# ==== greedy ====


def test_greedy_all_accepted_with_bonus():
    n, out = greedy_verify(torch.tensor([3, 1, 4]), make_logits([3, 1, 4, 7], 9).argmax(-1), cu_of([3]))
    assert n.tolist() == [3] and out.tolist() == [[3, 1, 4, 7]]


def test_greedy_first_token_mismatch():
    n, out = greedy_verify(torch.tensor([3, 1, 4]), make_logits([2, 1, 4, 7], 9).argmax(-1), cu_of([3]))
    assert n.tolist() == [0] and out.tolist() == [[2, -1, -1, -1]]


def test_greedy_middle_mismatch():
    n, out = greedy_verify(torch.tensor([3, 1, 4]), make_logits([3, 1, 5, 7], 9).argmax(-1), cu_of([3]))
    assert n.tolist() == [2] and out.tolist() == [[3, 1, 5, -1]]


def test_greedy_ragged_with_empty_drafts():
    # lengths [3, 0, 2, 1]: target rows 4 + 1 + 3 + 2
    drafts = torch.tensor([1, 2, 3, 4, 5, 6])
    target = make_logits([1, 2, 0, 8, 7, 4, 5, 2, 3, 3], 9).argmax(-1)
    n, out = greedy_verify(drafts, target, cu_of([3, 0, 2, 1]))
    assert n.dtype == out.dtype == torch.int64
    assert n.tolist() == [2, 0, 2, 0]
    assert out.tolist() == [[1, 2, 0, -1], [7, -1, -1, -1], [4, 5, 2, -1], [3, -1, -1, -1]]
    assert ((out != -1).sum(-1) == n + 1).all()  # each request emits num_accepted + 1 tokens


def test_greedy_degenerate_batches():
    n, out = greedy_verify(torch.zeros(0, dtype=torch.int64), torch.tensor([4, 6]), cu_of([0, 0]))
    assert n.tolist() == [0, 0] and out.tolist() == [[4], [6]]
    n, out = greedy_verify(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), cu_of([]))
    assert n.shape == (0,) and out.shape == (0, 1)


# ==== top-k / top-p / logits_to_probs ====


def reference_filter(row: list[float], k: int, p: float) -> list[bool]:
    """Kept mask of one row, written out plainly (top-k with ties, then the minimal nucleus)."""
    keep = [True] * len(row)
    if 0 < k < len(row):
        kth = sorted(row, reverse=True)[k - 1]
        keep = [x >= kth for x in row]
    if p < 1:
        t = torch.tensor([x if kp else NEG_INF for x, kp in zip(row, keep)]).softmax(-1).tolist()
        order = sorted(range(len(row)), key=lambda i: (-t[i], i))
        mass, nucleus = 0.0, set()
        for i in order:
            nucleus.add(i)
            mass += t[i]
            if mass >= p:
                break
        keep = [kp and i in nucleus for i, kp in enumerate(keep)]
    return keep


def test_top_k_keeps_k_and_ties():
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0], [1.0, 3.0, 3.0, 2.0], [3.0, 3.0, 1.0, 0.0]])
    out = apply_top_k_top_p(x, torch.tensor([2, 2, 1]), torch.ones(3))
    kept = (~torch.isinf(out)).tolist()
    assert kept == [[False, True, False, True], [False, True, True, False], [True, True, False, False]]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0  # kept values unchanged
    assert x[0, 0] == 1.0  # input untouched


def test_top_k_off_values():
    x = torch.randn(3, 6)
    out = apply_top_k_top_p(x, torch.tensor([0, 6, 100]), torch.ones(3))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_top_p_minimal_nucleus_and_argmax():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(4, 1)
    out = apply_top_k_top_p(logp, torch.zeros(4, dtype=torch.int64), torch.tensor([0.75, 0.85, 0.01, 1.0]))
    kept = (~torch.isinf(out)).tolist()
    assert kept[0] == [True, True, False, False]
    assert kept[1] == [True, True, True, False]
    assert kept[2] == [True, False, False, False]  # the most likely token always survives
    assert kept[3] == [True] * 4


def test_top_p_applies_to_renormalised_top_k():
    # after top-k=2 the remainder is [0.571, 0.429]: top_p=0.55 keeps only the first token
    # (on the unrenormalised probabilities 0.4 < 0.55 would have kept both)
    logp = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = apply_top_k_top_p(logp, torch.tensor([2]), torch.tensor([0.55]))
    assert (~torch.isinf(out)).tolist() == [[True, False, False, False]]


def test_filter_matches_reference_with_mixed_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, 8, generator=g), torch.randint(0, 4, (40, 8), generator=g).float()])  # ties too
    k = torch.randint(0, 10, (80,), generator=g)
    p = torch.where(torch.rand(80, generator=g) < 0.3, torch.ones(80), torch.rand(80, generator=g) * 0.98 + 0.01)
    out = apply_top_k_top_p(x, k, p)
    for i in range(80):
        assert (~torch.isinf(out[i])).tolist() == reference_filter(x[i].tolist(), int(k[i]), float(p[i])), i
        row = apply_top_k_top_p(x[i : i + 1], k[i : i + 1], p[i : i + 1])  # batch == row by row
        assert torch.equal(row[0], out[i])


def test_logits_to_probs_greedy_rows_are_one_hot():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 0.0, 1.0, 2.0]], dtype=torch.bfloat16)
    t, k, p = torch.tensor([0.0, 0.0]), torch.tensor([1, 0]), torch.tensor([0.5, 1.0])
    probs = logits_to_probs(x, t, k, p)
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]  # first index on ties, like torch.argmax


def test_logits_to_probs_temperature_and_mixed_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=g) * 3
    t = torch.tensor([0.5, 1.0, 0.0, 2.0])
    k = torch.tensor([0, 0, 0, 3])
    p = torch.tensor([1.0, 0.9, 1.0, 1.0])
    probs = logits_to_probs(x, t, k, p)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(probs[0], (x[0] / 0.5).softmax(-1))
    assert probs[2].tolist() == torch.nn.functional.one_hot(x[2].argmax(), 10).float().tolist()
    for i in (1, 3):  # each row processed with its own parameters
        ref = apply_top_k_top_p(x[i : i + 1] / t[i], k[i : i + 1], p[i : i + 1]).softmax(-1)[0]
        torch.testing.assert_close(probs[i], ref)
    assert (probs[3] > 0).sum() == 3 and (probs[1] == 0).any()


# ==== sample_from_probs / draws ====


def test_sample_from_probs_one_hot_and_zero_guard():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1e-30]])
    noise = torch.tensor([[1.0, 0.1, 1.0], [0.0, 1.0, 2.0], [1e-38, 5.0, 5.0]])
    assert sample_from_probs(probs, noise).tolist() == [1, 1, 2]


def test_sample_from_probs_distribution():
    probs = torch.tensor([0.05, 0.5, 0.0, 0.3, 0.15])[None].repeat(20000, 1) * 3  # unnormalised is fine
    noise = torch.empty(20000, 5).exponential_(generator=torch.Generator().manual_seed(3))
    assert chisquare_pvalue(sample_from_probs(probs, noise), probs[0] / 3) > 1e-3


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_draws_are_per_request():
    u = draw_uniforms(gens(1, 2, 3), [3, 0, 2])
    assert u.shape == (5,) and u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    assert torch.equal(u[:3], draw_uniforms(gens(1), [3]))  # alone == in a batch
    assert torch.equal(u[3:], draw_uniforms(gens(3), torch.tensor([2])))
    assert torch.equal(u[3:], torch.rand(2, generator=gens(3)[0]))
    e = draw_exponentials(gens(1, 2), 7)
    assert e.shape == (2, 7) and (e > 0).all()
    assert torch.equal(e[1], draw_exponentials(gens(2), 7)[0])
    assert torch.equal(e[1], torch.empty(7).exponential_(generator=gens(2)[0]))
    assert draw_uniforms([], []).shape == (0,) and draw_exponentials([], 4).shape == (0, 4)
    big = draw_exponentials(gens(4), 20000)
    assert abs(float(big.mean()) - 1) < 0.03  # Exp(1)


def test_draws_with_global_rng():
    torch.manual_seed(5)
    a = draw_uniforms([None, gens(1)[0]], [2, 1])
    torch.manual_seed(5)
    assert torch.equal(a[:2], torch.rand(2)) and torch.equal(a[2:], torch.rand(1, generator=gens(1)[0]))


# ==== rejection sampling: greedy equivalence ====


def test_rejection_with_one_hot_probs_equals_greedy():
    g = torch.Generator().manual_seed(7)
    V = 7
    for case in range(50):
        lengths = torch.randint(0, 6, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        r, d = lengths.numel(), int(lengths.sum())
        cu = cu_of(lengths)
        tgt_logits = torch.randint(0, 4, (d + r, V), generator=g).float()  # ties exercise the tie rule
        req = torch.repeat_interleave(torch.arange(r), lengths)
        rows = torch.arange(d) + req  # target row of each draft position
        # drafts mostly agree with the target, so long accepted prefixes occur
        same = torch.rand(d, generator=g) < 0.75
        drf_logits = torch.where(same[:, None], tgt_logits[rows], torch.randn(d, V, generator=g))
        greedy = params(d + r, t=0.0)
        p_t = logits_to_probs(tgt_logits, *greedy)
        p_d = logits_to_probs(drf_logits, *params(d, t=0.0))
        drafts = p_d.argmax(-1) if case % 2 else torch.randint(0, V, (d,), generator=g)  # also off-p_d drafts
        u = torch.rand(d, generator=g)
        e = torch.empty(r, V).exponential_(generator=g)
        n_rs, out_rs = rejection_sample(drafts, p_d, p_t, cu, u, e)
        n_gv, out_gv = greedy_verify(drafts, tgt_logits.argmax(-1), cu)
        assert torch.equal(n_rs, n_gv) and torch.equal(out_rs, out_gv), case


def test_rejection_zero_residual_falls_back_to_target():
    p_t = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]])
    p_d = 2 * p_t[:1]  # p_d >= p_t everywhere (numerically off): rejection leaves a zero residual
    e = torch.tensor([[0.1, 1.0, 0.5, 0.1]])
    n, out = rejection_sample(torch.tensor([1]), p_d, p_t, cu_of([1]), torch.tensor([0.9]), e)
    assert n.tolist() == [0] and out.tolist() == [[2, -1]]  # drawn from p_t, never from its zeros


# ==== rejection sampling: distribution ====

V = 5


def chain(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """A Markov target P_t[prev] and a deliberately different draft P_d[prev], both processed alike."""
    g = torch.Generator().manual_seed(11)
    lt = torch.randn(V, V, generator=g) * 1.5
    ld = lt.flip(-1) * 0.5 + torch.randn(V, V, generator=g)
    proc = params(V, temperature, top_k, top_p)
    return logits_to_probs(lt, *proc), logits_to_probs(ld, *proc)


def speculate(P_t, P_d, lengths, n_tokens, seed, mode="exact"):
    """Emit ``n_tokens`` per request (context token 0) by repeated verify steps; returns [N, n_tokens].

    Request r drafts ``lengths[r]`` tokens per step from P_d. ``mode`` breaks the algorithm for the
    negative controls: "accept_all" (u = 0: every draft with p_t > 0 accepted), "no_residual"
    (recovered tokens drawn from p_t instead of the residual).
    Also returns the first step's num_accepted [N].
    """
    g = torch.Generator().manual_seed(seed)
    n = lengths.numel()
    first_accepted = None
    emitted = torch.full((n, n_tokens), -1, dtype=torch.int64)
    count = torch.zeros(n, dtype=torch.int64)
    prev = torch.zeros(n, dtype=torch.int64)
    while (count < n_tokens).any():
        act = (count < n_tokens).nonzero().squeeze(1)
        ell = lengths[act]
        lmax = int(ell.max())
        ctx = [prev[act]]  # ctx[k] = the token preceding position k
        for _ in range(lmax):
            ctx.append(torch.multinomial(P_d[ctx[-1]], 1, generator=g).squeeze(1))
        ctx = torch.stack(ctx, 1)  # [A, lmax+1]
        dmask = torch.arange(lmax)[None] < ell[:, None]
        tmask = torch.arange(lmax + 1)[None] <= ell[:, None]
        drafts = ctx[:, 1:][dmask]
        p_d, p_t = P_d[ctx[:, :-1][dmask]], P_t[ctx[tmask]]
        cu = cu_of(ell)
        u = torch.rand(drafts.numel(), generator=g)
        e = torch.empty(act.numel(), V).exponential_(generator=g)
        n_acc, out = rejection_sample(drafts, p_d, p_t, cu, torch.zeros_like(u) if mode == "accept_all" else u, e)
        if mode == "no_residual":
            rej = (n_acc < ell).nonzero().squeeze(1)
            rows = cu[:-1][rej] + rej + n_acc[rej]
            fresh = torch.empty(rej.numel(), V).exponential_(generator=g)
            out[rej, n_acc[rej]] = sample_from_probs(p_t[rows], fresh)
        for j in range(lmax + 1):
            slot = count[act] + j
            ok = (j <= n_acc) & (slot < n_tokens)
            emitted[act[ok], slot[ok]] = out[ok, j]
        count[act] += n_acc + 1
        prev[act] = out[torch.arange(act.numel()), n_acc]
        first_accepted = n_acc if first_accepted is None else first_accepted
    return emitted, first_accepted


def expected_joint(P_t, n_tokens):  # [V^n] probabilities of the first n tokens under the target chain
    joint = P_t[0].double()  # index x1*V^(n-1) + ... + xn (last token fastest)
    for _ in range(n_tokens - 1):
        joint = (joint[:, None] * P_t.double()[torch.arange(joint.numel()) % V]).flatten()
    return joint


def encode(tokens):  # [N, n] -> [N] index into expected_joint
    idx = torch.zeros(tokens.shape[0], dtype=torch.int64)
    for j in range(tokens.shape[1]):
        idx = idx * V + tokens[:, j]
    return idx


CONFIGS = {"T=1": dict(), "T=0.8,top_k=4,top_p=0.9": dict(temperature=0.8, top_k=4, top_p=0.9)}


def test_single_position_first_token_and_acceptance_rate():
    P_t, P_d = chain()
    assert (P_t - P_d).abs().sum(-1).min() > 0.5  # the draft really is different
    lengths = torch.ones(20000, dtype=torch.int64)
    toks, acc = speculate(P_t, P_d, lengths, 1, seed=0)
    assert chisquare_pvalue(toks[:, 0], P_t[0]) > 1e-3
    beta = float(torch.minimum(P_t[0], P_d[0]).sum())  # acceptance probability of one draft
    assert abs(float(acc.float().mean()) - beta) < 4 * (beta * (1 - beta) / 20000) ** 0.5


@pytest.mark.parametrize("cfg", CONFIGS, ids=list(CONFIGS))
def test_chain_matches_target_distribution(cfg):
    P_t, P_d = chain(**CONFIGS[cfg])
    if cfg != "T=1":
        assert (P_t == 0).any() and (P_d == 0).any()  # the processing really filters
    lengths = torch.arange(40000) % 4  # ragged: ℓ in {0, 1, 2, 3}
    toks, _ = speculate(P_t, P_d, lengths, 3, seed=1)
    for ell in range(4):  # (a) the first emitted token follows p_t whatever the draft length
        assert chisquare_pvalue(toks[lengths == ell, 0], P_t[0]) > 1e-3, ell
    assert chisquare_pvalue(encode(toks[:, :2]), expected_joint(P_t, 2)) > 1e-3  # (b) first two tokens
    assert chisquare_pvalue(encode(toks), expected_joint(P_t, 3)) > 1e-3  # first three


@pytest.mark.parametrize("mode", ["accept_all", "no_residual"])
def test_negative_controls_are_rejected(mode):
    P_t, P_d = chain()
    lengths = torch.ones(20000, dtype=torch.int64)
    toks, _ = speculate(P_t, P_d, lengths, 1, seed=0, mode=mode)
    assert chisquare_pvalue(toks[:, 0], P_t[0]) < 1e-6


# ==== seeded determinism ====


def seeded_step(seeds: list[int], lengths: list[int], P_t, P_d):
    """One full verify step whose randomness comes only from per-request generators."""
    gs = gens(*seeds)
    ell = torch.tensor(lengths)
    drafts = torch.cat(
        [
            torch.multinomial(P_d[0], n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.int64)
            for g, n in zip(gs, lengths)
        ]
    )
    p_d = P_d[torch.zeros_like(drafts)]  # every position conditioned on context 0 (enough here)
    p_t = P_t[torch.zeros(int(ell.sum()) + len(seeds), dtype=torch.int64)]
    u = draw_uniforms(gs, ell)
    e = draw_exponentials(gs, V)
    return rejection_sample(drafts, p_d, p_t, cu_of(ell), u, e)


def test_same_seeds_same_tokens_regardless_of_batch():
    P_t, P_d = chain()
    seeds, lengths = [10, 20, 30, 40], [3, 0, 2, 3]
    n1, out1 = seeded_step(seeds, lengths, P_t, P_d)
    n2, out2 = seeded_step(seeds, lengths, P_t, P_d)
    assert torch.equal(n1, n2) and torch.equal(out1, out2)
    for r in range(4):  # request r alone emits exactly what it emitted in the batch
        n_alone, out_alone = seeded_step([seeds[r]], [lengths[r]], P_t, P_d)
        assert n_alone.item() == n1[r].item()
        assert out_alone[0, : lengths[r] + 1].tolist() == out1[r, : lengths[r] + 1].tolist()
    outs = {tuple(seeded_step([s], [3], P_t, P_d)[1][0].tolist()) for s in range(20)}
    assert len(outs) > 1  # and different seeds do differ


# ==== SamplingBatch ====


def test_sampling_batch():
    g0, g2 = gens(0, 2)
    b = SamplingBatch.from_params([(0.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 0.5)], [g0, None, g2])
    assert len(b) == 3
    assert b.temperature.dtype == torch.float32 and b.top_k.dtype == torch.int64 and b.top_p.dtype == torch.float32
    assert b.greedy.tolist() == [True, False, False]
    s = b.select([2, 0])
    assert s.top_p.tolist() == [0.5, 1.0] and s.generators == [g2, g0]
    assert b.select(torch.tensor([1])).top_k.tolist() == [5]
    rep = b.repeat_interleave(torch.tensor([2, 0, 3]))
    assert rep.temperature.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0, 1.0])
    assert rep.generators == [g0, g0, g2, g2, g2]
    probs = logits_to_probs(torch.randn(3, 8), b.temperature, b.top_k, b.top_p)
    assert probs.shape == (3, 8) and (probs[0] == 1).sum() == 1
    with pytest.raises(ValueError, match="2 params but 1 generators"):
        SamplingBatch.from_params([(0.0, 0, 1.0)] * 2, [None])
    with pytest.raises(ValueError, match=r"\[R=2\], got \[3\]"):
        SamplingBatch(torch.zeros(3), torch.zeros(2, dtype=torch.int64), torch.ones(2), [None, None])


# ==== shape validation ====


def test_shape_errors_name_the_shapes():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"\[5\]"):
        apply_top_k_top_p(x[0], torch.zeros(1, dtype=torch.int64), torch.ones(1))
    with pytest.raises(ValueError, match=r"N=3.*\[2\]"):
        logits_to_probs(x, torch.ones(2), torch.zeros(3, dtype=torch.int64), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[3, 5\], \[3, 4\]"):
        sample_from_probs(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"R=2.*\[3\]"):
        draw_uniforms([None, None], [1, 2, 3])
    drafts, cu = torch.tensor([1, 2, 3]), cu_of([2, 1])
    with pytest.raises(ValueError, match=r"D\+R=5.*\[4\]"):
        greedy_verify(drafts, torch.zeros(4, dtype=torch.int64), cu)
    with pytest.raises(ValueError, match=r"end at D=3, got \[0, 2, 4\]"):
        greedy_verify(drafts, torch.zeros(5, dtype=torch.int64), torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"\[D\], got \[3, 1\]"):
        greedy_verify(drafts[:, None], torch.zeros(5, dtype=torch.int64), cu)
    p_t, p_d, u, e = torch.rand(5, 6), torch.rand(3, 6), torch.rand(3), torch.rand(2, 6)
    rejection_sample(drafts, p_d, p_t, cu, u, e)  # the valid call
    bad = {
        "target_probs": (drafts, p_d, p_t[:4], cu, u, e, r"target_probs must be \[D\+R=5, V\], got \[4, 6\]"),
        "draft_probs": (drafts, p_d[:, :5], p_t, cu, u, e, r"draft_probs must be \[D=3, V=6\], got \[3, 5\]"),
        "uniforms": (drafts, p_d, p_t, cu, u[:2], e, r"uniforms must be \[D=3\], got \[2\]"),
        "exp_noise": (drafts, p_d, p_t, cu, u, e[:1], r"exp_noise must be \[R=2, V=6\], got \[1, 6\]"),
        "cu_draft": (drafts, p_d, p_t, cu[None], u, e, r"cu_draft must be \[R\+1\], got \[1, 3\]"),
    }
    for name, (*args, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            rejection_sample(*args)
