"""Speculative-decoding sampling math: pure functions, shared by the target and the drafters.

Terms (one verify step of one request r with ℓ_r draft tokens d_1..d_ℓ):

- p_t: target probabilities, p_d: draft probabilities. Both are produced by
  :func:`logits_to_probs` with the request's own temperature / top-k / top-p, so the rejection
  rule below preserves the *processed* target distribution exactly.
- accepted tokens: the longest prefix of drafts that passes verification (greedy: equal to the
  target's argmax; sampling: ``u_k < min(1, p_t(d_k) / p_d(d_k))`` with ``u_k ~ U[0, 1)``).
- recovered token: emitted at the first rejected position k instead of d_k, sampled from the
  residual ``norm(max(0, p_t − p_d))`` (greedy: the target's argmax there).
- bonus token: emitted when all ℓ_r drafts are accepted, sampled from p_t at the position after
  the last draft. Every request thus emits ``num_accepted + 1`` tokens per step.

Chain speculative sampling is lossless: the emitted tokens are distributed exactly as if sampled
one by one from p_t (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", arXiv 2211.17192; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling", arXiv 2302.01318). At temperature 0, p_t and p_d are one-hot and the rule
reduces to exact greedy matching, so greedy requests need no special case.

Ragged batch layout (used by :func:`greedy_verify` and :func:`rejection_sample`): the drafts of
all R requests are flattened into D rows, ``cu_draft`` ([R+1], cumulative lengths) delimits them,
and the target has ℓ_r + 1 rows per request (one per draft position plus the bonus position),
request r owning target rows ``cu_draft[r] + r .. cu_draft[r+1] + r``.

Randomness is explicit. Sampling uses the exponential race ``argmax(p / E)`` with E ~ Exp(1) per
vocabulary entry, an exact draw from p with no host synchronisation. Where E comes from decides
what a request's tokens depend on:

- *Keyed* rows (sampled requests that carry a seed, ``SamplingBatch.keys``): the noise of the
  request's n-th output token is ``E(key, n)`` (:func:`keyed_exponentials`), a pure function of
  the key and n, computed the same way on every device by a counter-based generator. The target's
  token at n is ``argmax(p_t / E(key, n))``, and verification reduces to matching: a draft for
  position n is accepted iff it equals that token (the target's rows become one-hot, exactly like
  greedy rows). A keyed request's output is therefore the target's own sampled output with that
  key, whatever the drafter, the verify lengths, the batch or the load: seeded requests are
  reproducible and token-identical to plain decoding with the same seed. The drafter samples
  with the same ``E(key, n)``, so a draft that agrees with the target in distribution also
  agrees token for token most of the time (the Gumbel coupling: acceptance >= (1 − δ)/(1 + δ)
  for total-variation distance δ, against 1 − δ for chain rejection sampling; "drafter-invariant
  speculative decoding", Daliri et al. 2024, arXiv 2408.07978; no scheme whose output ignores
  the drafter can do better in the worst case). No draft probabilities are needed to verify
  keyed rows. ``EngineConfig.reproducible_seeds: false`` turns keyed rows off.
- Other sampled rows (no seed): uniforms and Exp(1) noise are drawn from the request's own
  ``torch.Generator`` (:func:`draw_uniforms`, :func:`draw_exponentials`) and verified by chain
  rejection sampling, which accepts the most drafts but whose tokens depend on the verify lengths
  the scheduler picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SamplingBatch",
    "apply_top_k_top_p",
    "draw_exponentials",
    "draw_uniforms",
    "greedy_verify",
    "keyed_exponentials",
    "logits_to_probs",
    "rejection_sample",
    "row_seeds",
    "sample_from_probs",
]

#: residual mass below which the recovered token is drawn from p_t (the residual is ~0 iff p_t ≈ p_d)
RESIDUAL_EPS = 1e-12


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


@dataclass
class SamplingBatch:
    """Per-request sampling parameters of R requests (CPU tensors are fine: functions move them)."""

    temperature: torch.Tensor  # [R] float32; 0 = greedy
    top_k: torch.Tensor  # [R] int64; 0 = off
    top_p: torch.Tensor  # [R] float32; 1.0 = off
    generators: list[torch.Generator | None]  # [R]; None = the global RNG
    # [R] noise key of each request (None = unkeyed: noise from its generator); see the module notes
    keys: list[int | None] | None = None
    # [R] output index of the first token this batch samples per row (keyed rows: the n of E(key, n))
    offsets: list[int] | None = None

    def __post_init__(self) -> None:
        r = len(self.generators)
        for name in ("temperature", "top_k", "top_p"):
            t = getattr(self, name)
            _check(t.ndim == 1 and t.shape[0] == r, f"SamplingBatch.{name} must be [R={r}], got {_shape(t)}")
        self.keys = [None] * r if self.keys is None else [None if k is None else int(k) for k in self.keys]
        self.offsets = [0] * r if self.offsets is None else [int(o) for o in self.offsets]
        _check(len(self.keys) == r and len(self.offsets) == r,
               f"SamplingBatch.keys/offsets must have R={r} entries, got {len(self.keys)}, {len(self.offsets)}")

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def greedy(self) -> torch.Tensor:  # [R] bool
        return self.temperature == 0

    @property
    def keyed(self) -> list[bool]:  # [R]: sampled rows whose noise is E(key, n)
        return [k is not None and float(t) > 0 for k, t in zip(self.keys, self.temperature.tolist())]

    @staticmethod
    def from_params(
        params: list[tuple[float, int, float]],
        generators: list[torch.Generator | None],
        keys: list[int | None] | None = None,
        offsets: list[int] | None = None,
    ) -> "SamplingBatch":
        """``params[r] = (temperature, top_k, top_p)``."""
        _check(len(params) == len(generators), f"{len(params)} params but {len(generators)} generators")
        return SamplingBatch(
            temperature=torch.tensor([float(p[0]) for p in params], dtype=torch.float32),
            top_k=torch.tensor([int(p[1]) for p in params], dtype=torch.int64),
            top_p=torch.tensor([float(p[2]) for p in params], dtype=torch.float32),
            generators=list(generators),
            keys=keys,
            offsets=offsets,
        )

    def select(self, idx: list[int] | torch.Tensor) -> "SamplingBatch":
        """Sub-batch of the requests ``idx`` (in that order)."""
        ids = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        t = torch.tensor(ids, dtype=torch.int64)
        return SamplingBatch(
            self.temperature[t.to(self.temperature.device)],
            self.top_k[t.to(self.top_k.device)],
            self.top_p[t.to(self.top_p.device)],
            [self.generators[i] for i in ids],
            [self.keys[i] for i in ids],
            [self.offsets[i] for i in ids],
        )

    def repeat_interleave(self, counts: torch.Tensor) -> "SamplingBatch":
        """Row r repeated ``counts[r]`` times (per-request params -> per-token rows); the j-th
        copy samples output index ``offsets[r] + j``."""
        c = torch.as_tensor(counts, dtype=torch.int64).cpu()  # [R]
        _check(c.ndim == 1 and c.shape[0] == len(self), f"counts must be [R={len(self)}], got {_shape(c)}")
        rep = lambda t: t.repeat_interleave(c.to(t.device))  # noqa: E731
        n = c.tolist()
        gens = [g for g, m in zip(self.generators, n) for _ in range(m)]
        keys = [k for k, m in zip(self.keys, n) for _ in range(m)]
        offsets = [o + j for o, m in zip(self.offsets, n) for j in range(m)]
        return SamplingBatch(rep(self.temperature), rep(self.top_k), rep(self.top_p), gens, keys, offsets)

    def exponentials(self, vocab_size: int, device: torch.device | str | None = None, step: int = 0) -> torch.Tensor:
        """[R, V] Exp(1) noise for the tokens at output index ``offsets[r] + step``: keyed rows get
        ``E(key, n)``; the others draw from their generators, in row order (as :func:`draw_exponentials`)."""
        keyed = self.keyed
        out = draw_exponentials(self.generators, vocab_size, device, skip=keyed)  # [R, V]
        idx = [i for i, k in enumerate(keyed) if k]
        if idx:
            out[idx] = keyed_exponentials([self.keys[i] for i in idx], [self.offsets[i] + step for i in idx],
                                          vocab_size, device)
        return out

    def uniforms(self, counts: list[int], device: torch.device | str | None = None) -> torch.Tensor:
        """[Σ counts] uniforms for the acceptance tests: zeros for keyed rows (their verification is
        a match and reads none), drawn from the generators for the others (as :func:`draw_uniforms`)."""
        return draw_uniforms(self.generators, counts, device, skip=self.keyed)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [N, V] float
    top_k: torch.Tensor,  # [N] int64; 0 (or >= V) = off
    top_p: torch.Tensor,  # [N] float; >= 1 = off
) -> torch.Tensor:  # [N, V], same dtype, filtered entries = -inf
    """Top-k, then top-p on the renormalised remainder; returns a new tensor.

    Top-k keeps every entry >= the k-th largest value (ties at the boundary are all kept, like
    HF ``TopKLogitsWarper``). Top-p keeps the smallest highest-first prefix whose mass is
    >= top_p (ties ordered by index); the most likely token always survives.
    """
    _check(logits.ndim == 2, f"logits must be [N, V], got {_shape(logits)}")
    n, v = logits.shape
    _check(
        top_k.shape == (n,) and top_p.shape == (n,),
        f"top_k/top_p must be [N={n}], got {_shape(top_k)}, {_shape(top_p)}",
    )
    on_host = top_k.device.type == "cpu" and top_p.device.type == "cpu"
    if n == 0 or (on_host and not (((top_k > 0) & (top_k < v)).any() or (top_p < 1).any())):
        return logits.clone()  # nothing to filter (checked on host only: no device sync)
    k = top_k.to(logits.device)
    p = top_p.to(device=logits.device, dtype=torch.float32)
    srt, idx = logits.float().sort(dim=-1, descending=True, stable=True)  # [N, V]
    kth = srt.gather(-1, (k.clamp(1, v) - 1)[:, None])  # [N, 1]
    remove = (srt < kth) & ((k > 0) & (k < v))[:, None]  # [N, V] sorted order
    probs = srt.masked_fill(remove, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove |= (mass_before >= p[:, None]) & (p < 1)[:, None]
    remove[:, 0] = False  # the argmax always survives
    mask = torch.empty_like(remove).scatter_(-1, idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def logits_to_probs(
    logits: torch.Tensor,  # [N, V] float (any float dtype)
    temperature: torch.Tensor,  # [N] float; 0 = greedy
    top_k: torch.Tensor,  # [N] int64
    top_p: torch.Tensor,  # [N] float
) -> torch.Tensor:  # [N, V] float32
    """The processed distribution a token is sampled from; applied identically to p_t and p_d.

    Greedy rows (T == 0) become the one-hot of ``torch.argmax`` (first index on ties); the rest are
    ``softmax(apply_top_k_top_p(logits / T, top_k, top_p))`` in float32.
    """
    _check(logits.ndim == 2, f"logits must be [N, V], got {_shape(logits)}")
    n = logits.shape[0]
    _check(
        temperature.shape == (n,) and top_k.shape == (n,) and top_p.shape == (n,),
        f"temperature/top_k/top_p must be [N={n}], got {_shape(temperature)}, {_shape(top_k)}, {_shape(top_p)}",
    )
    x = logits.float()
    t = temperature.to(device=x.device, dtype=torch.float32)
    greedy = t == 0  # [N]
    scaled = x / torch.where(greedy, torch.ones_like(t), t)[:, None]
    probs = apply_top_k_top_p(scaled, top_k, top_p).softmax(-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def draw_uniforms(
    generators: list[torch.Generator | None],  # [R]
    counts: list[int] | torch.Tensor,  # [R]
    device: torch.device | str | None = None,
    skip: list[bool] | None = None,  # [R]: rows that get zeros and draw nothing
) -> torch.Tensor:  # [sum(counts)] float32 in [0, 1)
    """Request r's ``counts[r]`` uniforms come from ``generators[r]`` only, in request order.

    Each draw runs on its generator's device (None: on ``device`` with the global RNG); the result
    is moved to ``device`` (default CPU).
    """
    cs = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    _check(len(cs) == len(generators), f"counts must be [R={len(generators)}], got [{len(cs)}]")
    skip = skip or [False] * len(cs)
    out = [
        torch.zeros(c, device=device) if s else
        torch.rand(c, generator=g, device=g.device if g is not None else device).to(device)
        for g, c, s in zip(generators, cs, skip)
    ]
    return torch.cat(out) if out else torch.empty(0, device=device)


def draw_exponentials(
    generators: list[torch.Generator | None],  # [R]
    vocab_size: int,
    device: torch.device | str | None = None,
    skip: list[bool] | None = None,  # [R]: rows that get ones and draw nothing
) -> torch.Tensor:  # [R, V] float32 Exp(1)
    """Row r is drawn from ``generators[r]`` only (same device rules as :func:`draw_uniforms`)."""
    skip = skip or [False] * len(generators)
    rows = [
        torch.ones(vocab_size, device=device) if s else
        torch.empty(vocab_size, device=g.device if g is not None else device).exponential_(generator=g).to(device)
        for g, s in zip(generators, skip)
    ]
    return torch.stack(rows) if rows else torch.empty(0, vocab_size, device=device)


# splitmix64 (Steele, Lea & Flood 2014) on int64 tensors: wrapping multiplication, logical shifts.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(c: int) -> int:  # a uint64 constant as the int64 with the same bits
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:  # logical right shift of int64 bits
    return (z >> s) & ((1 << (64 - s)) - 1)


def _fmix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _i64(_MIX1)
    z = (z ^ _shr(z, 27)) * _i64(_MIX2)
    return z ^ _shr(z, 31)


def keyed_exponentials(
    keys: list[int] | torch.Tensor,  # [N] noise keys (any int; taken mod 2**64)
    index: list[int] | torch.Tensor,  # [N] output index n of each row
    vocab_size: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [N, V] float32 Exp(1)
    """E(key, n): Exp(1) noise that is a pure function of (key, n, v), the same on every device.

    Counter-based: row seed s = fmix(fmix(key + g) + (n + 1)·g), then entry v is the v-th output
    of a splitmix64 stream seeded with s, u = its top 53 bits / 2**53 and E = −log(1 − u) (in
    float64, then float32). Rows with different (key, n) are independent streams.
    """
    k = torch.as_tensor([_i64(int(x)) for x in keys] if not isinstance(keys, torch.Tensor) else keys,
                        dtype=torch.int64, device=device)
    n = torch.as_tensor(index, dtype=torch.int64, device=device)
    _check(k.ndim == 1 and n.shape == k.shape, f"keys and index must both be [N], got {_shape(k)}, {_shape(n)}")
    row = _fmix64(_fmix64(k + _i64(_GOLDEN)) + (n + 1) * _i64(_GOLDEN))  # [N]
    v = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=k.device) * _i64(_GOLDEN)  # [V]
    bits = _fmix64(row[:, None] + v[None, :])  # [N, V]
    u = _shr(bits, 11).double() * (1.0 / (1 << 53))  # [N, V] in [0, 1)
    return (-torch.log1p(-u)).float()


def sample_from_probs(
    probs: torch.Tensor,  # [N, V] non-negative, need not be normalised
    exp_noise: torch.Tensor,  # [N, V] Exp(1)
) -> torch.Tensor:  # [N] int64
    """Exponential race ``argmax(p / E)``: an exact draw from p, no host sync.

    One-hot rows return their index; a zero-probability token is never chosen (unless the whole
    row is zero, which returns index 0).
    """
    _check(
        probs.ndim == 2 and exp_noise.shape == probs.shape,
        f"probs and exp_noise must both be [N, V], got {_shape(probs)}, {_shape(exp_noise)}",
    )
    score = probs.float() / exp_noise.to(probs.device).float()  # E == 0 gives +inf: that token wins the race
    return torch.where(probs > 0, score, torch.full_like(score, -1.0)).argmax(-1)


def _layout(cu_draft: torch.Tensor, num_drafts: int, device: torch.device):
    """Validated ragged layout: (cu [R+1] on device, R, max ℓ, request of each draft [D], position [D])."""
    _check(cu_draft.ndim == 1 and cu_draft.shape[0] >= 1, f"cu_draft must be [R+1], got {_shape(cu_draft)}")
    host = cu_draft.detach().to("cpu", torch.int64)  # tiny; the output width needs max ℓ on host anyway
    lengths = host.diff()
    _check(
        int(host[0]) == 0 and int(host[-1]) == num_drafts and bool((lengths >= 0).all()),
        f"cu_draft must start at 0, be non-decreasing and end at D={num_drafts}, got {host.tolist()}",
    )
    r = host.shape[0] - 1
    max_len = int(lengths.max()) if r else 0
    cu = host.to(device)
    req = torch.repeat_interleave(torch.arange(r, device=device), lengths.to(device))  # [D]
    pos = torch.arange(num_drafts, device=device) - cu[req]  # [D]
    return cu, r, max_len, req, pos


def _accepted_prefix(draft_tokens, accept, r, max_len, req, pos):
    """num_accepted [R] (accepted-prefix lengths); output [R, max ℓ+1]: accepted drafts, -1 elsewhere."""
    dev = draft_tokens.device
    acc = torch.zeros(r, max_len, dtype=torch.int64, device=dev)  # padding counts as rejected
    acc[req, pos] = accept.to(torch.int64)
    num_acc = acc.cumprod(-1).sum(-1)  # [R]
    out = torch.full((r, max_len + 1), -1, dtype=torch.int64, device=dev)
    out[req, pos] = torch.where(pos < num_acc[req], draft_tokens.to(torch.int64), -1)
    return num_acc, out


def _place_final(out, num_acc, final):
    """Write each request's final token (recovered or bonus) at column num_accepted."""
    out[torch.arange(out.shape[0], device=out.device), num_acc] = final.to(torch.int64)
    return out


def greedy_verify(
    draft_tokens: torch.Tensor,  # [D] int64, all requests' drafts flattened
    target_argmax: torch.Tensor,  # [D+R] int64, request r owns rows cu_draft[r]+r .. cu_draft[r+1]+r
    cu_draft: torch.Tensor,  # [R+1] int64 cumulative draft lengths
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] int64, output_tokens [R, max ℓ+1] int64 (-1 pad)
    """Accept the longest prefix equal to the target's argmax, then emit the target's token."""
    # Fast path: dspark.kernels.rejection (one Triton launch, identical outputs) when the kernel
    # dispatcher picks Triton for these tensors (CUDA by default); CPU runs take the code below.
    from dspark.kernels.dispatch import use_triton

    if use_triton(draft_tokens):
        from dspark.kernels.rejection import greedy_verify_triton

        return greedy_verify_triton(draft_tokens, target_argmax, cu_draft)
    _check(draft_tokens.ndim == 1, f"draft_tokens must be [D], got {_shape(draft_tokens)}")
    d = draft_tokens.shape[0]
    cu, r, max_len, req, pos = _layout(cu_draft, d, draft_tokens.device)
    _check(target_argmax.shape == (d + r,), f"target_argmax must be [D+R={d + r}], got {_shape(target_argmax)}")
    tgt = target_argmax.to(draft_tokens.device)
    accept = draft_tokens == tgt[torch.arange(d, device=tgt.device) + req]
    num_acc, out = _accepted_prefix(draft_tokens, accept, r, max_len, req, pos)
    final = tgt[cu[:-1] + torch.arange(r, device=tgt.device) + num_acc]  # [R]: mismatch or bonus row
    return num_acc, _place_final(out, num_acc, final)


def rejection_sample(
    draft_tokens: torch.Tensor,  # [D] int64
    draft_probs: torch.Tensor,  # [D, V] float32, p_d at each draft position
    target_probs: torch.Tensor,  # [D+R, V] float32, p_t (rows laid out as in greedy_verify)
    cu_draft: torch.Tensor,  # [R+1] int64
    uniforms: torch.Tensor,  # [D] float32 in [0, 1), one per draft token
    exp_noise: torch.Tensor,  # [R, V] Exp(1), one row per request for its final token
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] int64, output_tokens [R, max ℓ+1] int64 (-1 pad)
    """Chain speculative sampling (Leviathan et al. 2023, Chen et al. 2023); same outputs as greedy_verify.

    Accept d_k iff ``u_k · p_d(d_k) < p_t(d_k)`` (no division; a token with p_d = 0 is accepted iff
    p_t > 0, one with p_t = 0 never). At the first rejection the recovered token is drawn from
    ``max(0, p_t − p_d)`` (from p_t when that mass is < RESIDUAL_EPS); after ℓ_r acceptances the
    bonus token is drawn from p_t at the request's last row. Both use ``exp_noise[r]``.
    """
    # Fast path: dspark.kernels.rejection (one Triton launch, identical outputs given the same
    # uniforms and noise) when the kernel dispatcher picks Triton for these tensors (CUDA by
    # default); CPU runs take the reference code below, unchanged.
    from dspark.kernels.dispatch import use_triton

    if use_triton(target_probs):
        from dspark.kernels.rejection import rejection_sample_triton

        return rejection_sample_triton(draft_tokens, draft_probs, target_probs, cu_draft, uniforms, exp_noise)
    _check(draft_tokens.ndim == 1, f"draft_tokens must be [D], got {_shape(draft_tokens)}")
    d = draft_tokens.shape[0]
    _check(target_probs.ndim == 2, f"target_probs must be [D+R, V], got {_shape(target_probs)}")
    v = target_probs.shape[1]
    dev = target_probs.device
    cu, r, max_len, req, pos = _layout(cu_draft, d, dev)
    _check(target_probs.shape == (d + r, v), f"target_probs must be [D+R={d + r}, V], got {_shape(target_probs)}")
    _check(draft_probs.shape == (d, v), f"draft_probs must be [D={d}, V={v}], got {_shape(draft_probs)}")
    _check(uniforms.shape == (d,), f"uniforms must be [D={d}], got {_shape(uniforms)}")
    _check(exp_noise.shape == (r, v), f"exp_noise must be [R={r}, V={v}], got {_shape(exp_noise)}")
    tok = draft_tokens.to(dev, torch.int64)

    # acceptance test for every draft token at once
    rows = torch.arange(d, device=dev)
    p_d = draft_probs[rows, tok].float()  # [D]
    p_t = target_probs[rows + req, tok].float()  # [D]
    accept = uniforms.to(dev).float() * p_d < p_t
    num_acc, out = _accepted_prefix(tok, accept, r, max_len, req, pos)

    # one final token per request: recovered (residual at the first rejected row) or bonus (p_t)
    lengths = cu[1:] - cu[:-1]  # [R]
    rejected = num_acc < lengths  # [R]
    pt_rows = target_probs[cu[:-1] + torch.arange(r, device=dev) + num_acc].float()  # [R, V]
    if d:
        pd_rows = draft_probs[(cu[:-1] + num_acc).clamp(max=d - 1)].float()
        pd_rows = torch.where(rejected[:, None], pd_rows, torch.zeros_like(pd_rows))
    else:
        pd_rows = torch.zeros_like(pt_rows)
    residual = (pt_rows - pd_rows).clamp_min(0.0)
    use_residual = rejected & (residual.sum(-1) >= RESIDUAL_EPS)
    final = sample_from_probs(torch.where(use_residual[:, None], residual, pt_rows), exp_noise)
    return num_acc, _place_final(out, num_acc, final)


def row_seeds(sampling: SamplingBatch) -> list[int | None]:
    """A draft seed per unkeyed sampled row, drawn from the request's own generator (None for
    greedy rows, keyed rows, whose drafts use E(key, n) instead, and requests without a
    generator): a remote drafter's sampled drafts are then reproducible. Every caller that must
    keep a request's random stream in step with a ``propose`` (the tensor-parallel ranks that
    mirror rank 0) draws exactly these."""
    seeds: list[int | None] = []
    for i, (g, keyed) in enumerate(zip(sampling.generators, sampling.keyed)):
        greedy = float(sampling.temperature[i]) == 0.0
        seeds.append(None if greedy or keyed or g is None else int(torch.randint(0, 2**62, (1,), generator=g)))
    return seeds
