"""Ragged greedy verification and chain rejection sampling as one Triton launch each.

One program per request r (grid ``[R]``); request r owns drafts ``cu[r] .. cu[r+1]−1`` and target
rows ``cu[r]+r .. cu[r+1]+r`` (the layout of :mod:`dspark.platform.sampling`). A program

1. finds the first rejected draft in chunks of ``BLOCK_L`` positions (greedy: draft ≠ target
   argmax; sampling: ``u·p_d(d) ≥ p_t(d)``, the two probabilities gathered straight from the
   caller's ``[D, V]`` / ``[D+R, V]`` tensors through their strides — no copies, no ``.float()``
   pass over the vocabulary);
2. picks the final token. Greedy: the target argmax at that row. Sampling: the exponential race
   ``argmax(q / E)`` over vocabulary tiles of ``BLOCK_V``, where q is the residual
   ``max(p_t − p_d, 0)`` at a rejection (p_t when the residual mass is below ``eps``) and p_t for
   the bonus token. A rejection costs two passes (residual mass, then the race), a bonus one.
3. writes its output row: accepted drafts, the final token, then −1 padding.

Every comparison is done in float32 on the same values as the reference, so the outputs are
bit-identical to :func:`dspark.platform.sampling.rejection_sample` given the same uniforms and
noise (the residual-mass threshold is a sum in a different order: only a mass within rounding
of ``eps`` could decide differently).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.kernels._triton_common import is_interpreted, tile_argmax

__all__ = ["INTERPRETED", "greedy_verify", "rejection_sample"]

#: draft positions handled per chunk (drafts per request are few: one chunk in practice)
BLOCK_L = 16
#: vocabulary tile of the residual / race passes
BLOCK_V = 2048


@triton.jit
def _write_row(out_ptr, width, tok_ptr, start, num_acc, final, BLOCK_L: tl.constexpr):
    """out_ptr[:width] (request r's output row) = [d_1..d_{num_acc}, final, −1, …]."""
    for c in range(0, width, BLOCK_L):
        offs = c + tl.arange(0, BLOCK_L)
        in_row = offs < width
        d = tl.load(tok_ptr + start + offs, mask=in_row & (offs < num_acc), other=-1).to(tl.int64)
        val = tl.where(offs == num_acc, final, d)
        tl.store(out_ptr + offs, val, mask=in_row)


@triton.jit
def _greedy_verify_kernel(
    tok_ptr,  # [D] int64 drafts
    argmax_ptr,  # [D+R] int64 target argmax
    cu_ptr,  # [R+1] int64
    num_acc_ptr,  # [R] int64 out
    out_ptr,  # [R, width] int64 out
    out_stride,
    width,
    BLOCK_L: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(cu_ptr + r)
    n = tl.load(cu_ptr + r + 1) - start
    first = n  # index of the first mismatch; n = all accepted
    for c in range(0, n, BLOCK_L):
        offs = c + tl.arange(0, BLOCK_L)
        live = offs < n
        d = tl.load(tok_ptr + start + offs, mask=live, other=0)
        t = tl.load(argmax_ptr + start + r + offs, mask=live, other=0)
        first = tl.minimum(first, tl.min(tl.where(live & (d != t), offs, n), axis=0))
    final = tl.load(argmax_ptr + start + r + first).to(tl.int64)  # mismatch row, or the bonus row
    tl.store(num_acc_ptr + r, first)
    _write_row(out_ptr + r.to(tl.int64) * out_stride, width, tok_ptr, start, first, final, BLOCK_L)


@triton.jit
def _rejection_sample_kernel(
    tok_ptr,  # [D] int64 drafts
    pd_ptr, pd_s0, pd_s1,  # [D, V] p_d (any float dtype, any strides)
    pt_ptr, pt_s0, pt_s1,  # [D+R, V] p_t
    u_ptr,  # [D] float32 uniforms
    e_ptr, e_s0, e_s1,  # [R, V] Exp(1) noise
    cu_ptr,  # [R+1] int64
    num_acc_ptr,  # [R] int64 out
    out_ptr,  # [R, width] int64 out
    out_stride,
    width,
    V,
    eps,
    BLOCK_L: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(cu_ptr + r)
    n = tl.load(cu_ptr + r + 1) - start
    pt_base = start + r  # this request's first target row

    # 1. acceptance u_k·p_d(d_k) < p_t(d_k), in float32 exactly as the reference (no division)
    first = n
    for c in range(0, n, BLOCK_L):
        offs = c + tl.arange(0, BLOCK_L)
        live = offs < n
        d = tl.load(tok_ptr + start + offs, mask=live, other=0).to(tl.int64)
        p_d = tl.load(pd_ptr + (start + offs) * pd_s0 + d * pd_s1, mask=live, other=0.0).to(tl.float32)
        p_t = tl.load(pt_ptr + (pt_base + offs) * pt_s0 + d * pt_s1, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + start + offs, mask=live, other=0.0).to(tl.float32)
        rejected = live & ~(u * p_d < p_t)
        first = tl.minimum(first, tl.min(tl.where(rejected, offs, n), axis=0))

    # 2. the final token's distribution: residual at a rejection, p_t for the bonus
    pt_row = pt_ptr + (pt_base + first) * pt_s0
    pd_row = pd_ptr + (start + first) * pd_s0  # only dereferenced when rejected (then first < n)
    e_row = e_ptr + r.to(tl.int64) * e_s0
    is_rejected = first < n
    mass = 0.0
    if is_rejected:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            live = offs < V
            p_t = tl.load(pt_row + offs * pt_s1, mask=live, other=0.0).to(tl.float32)
            p_d = tl.load(pd_row + offs * pd_s1, mask=live, other=0.0).to(tl.float32)
            mass += tl.sum(tl.maximum(p_t - p_d, 0.0), axis=0)
    use_residual = is_rejected & (mass >= eps)

    # exponential race argmax(q / E); q = 0 scores −1 (never chosen unless the row is all zero)
    best_val = -float("inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        live = offs < V
        p_t = tl.load(pt_row + offs * pt_s1, mask=live, other=0.0).to(tl.float32)
        # NOTE: tl.where rather than `live & use_residual`: the interpreter turns a vector & scalar
        # mask into int32, which tl.load rejects
        p_d = tl.load(pd_row + offs * pd_s1, mask=tl.where(use_residual, live, False), other=0.0).to(tl.float32)
        q = tl.where(use_residual, tl.maximum(p_t - p_d, 0.0), p_t)
        e = tl.load(e_row + offs * e_s1, mask=live, other=1.0).to(tl.float32)
        score = tl.where(q > 0, tl.math.div_rn(q, e), -1.0)  # IEEE division, as torch (`/` is approximate)
        score = tl.where(live, score, -float("inf"))
        best_val, best_idx = tile_argmax(score, offs, best_val, best_idx, V)

    tl.store(num_acc_ptr + r, first)
    _write_row(out_ptr + r.to(tl.int64) * out_stride, width, tok_ptr, start, first, best_idx.to(tl.int64), BLOCK_L)


INTERPRETED = is_interpreted(_rejection_sample_kernel)


def _outputs(r: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(r, dtype=torch.int64, device=device),
            torch.empty(r, width, dtype=torch.int64, device=device))


def greedy_verify(
    draft_tokens: torch.Tensor,  # [D] int64 on the launch device
    target_argmax: torch.Tensor,  # [D+R] int64
    cu: torch.Tensor,  # [R+1] int64 on the launch device
    max_len: int,  # max ℓ (from the validated layout)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1]
    r = cu.shape[0] - 1
    num_acc, out = _outputs(r, max_len + 1, draft_tokens.device)
    if r:
        _greedy_verify_kernel[(r,)](draft_tokens, target_argmax, cu, num_acc, out, out.stride(0), max_len + 1,
                                    BLOCK_L=BLOCK_L, num_warps=1)
    return num_acc, out


def rejection_sample(
    draft_tokens: torch.Tensor,  # [D] int64 on the launch device
    draft_probs: torch.Tensor,  # [D, V] float
    target_probs: torch.Tensor,  # [D+R, V] float
    cu: torch.Tensor,  # [R+1] int64
    max_len: int,
    uniforms: torch.Tensor,  # [D] float32
    exp_noise: torch.Tensor,  # [R, V] float
    eps: float,
    block_v: int = BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1]
    r, v = cu.shape[0] - 1, target_probs.shape[1]
    num_acc, out = _outputs(r, max_len + 1, target_probs.device)
    if r:
        # 4 warps stream a 2048-wide tile; the grid is tiny (one program per request), so the
        # per-request latency, not occupancy, is what the tile size trades against
        _rejection_sample_kernel[(r,)](
            draft_tokens, draft_probs, *draft_probs.stride(), target_probs, *target_probs.stride(),
            uniforms, exp_noise, *exp_noise.stride(), cu, num_acc, out, out.stride(0), max_len + 1, v, float(eps),
            BLOCK_L=BLOCK_L, BLOCK_V=block_v, num_warps=4,
        )
    return num_acc, out
