"""The drafter's per-slot loss terms in vocabulary tiles: forward and backward kernels.

One program per evaluated row n (a block slot), z = the drafter logits, t = p_t, y = the label:

forward, two passes over tiles of ``BLOCK_V``
  1. online softmax: m, s = Σ exp(z − m) (rescaled when m grows), plus Σt and Σ t·z;
     lse = m + log s, ce = lse − z_y, soft = −Σ t·(z − lse) = lse·Σt − Σ t·z;
  2. with p = exp(z − lse): l1 = Σ |p − t| and S = Σ p·sign(p − t).
  Only [N]-sized values are written (ce, l1, soft and, for the backward, lse, S, Σt): neither
  softmax is ever materialised.

backward, one pass: for upstream gradients (g_ce, g_l1, g_soft) of row n,
  ∂/∂z_j = g_ce·(p_j − [j = y]) + g_l1·p_j·(sign(p_j − t_j) − S) + g_soft·(Σt·p_j − t_j)
  — the chain rule through log_softmax of exactly what autograd differentiates in the reference
  (``abs`` has gradient 0 at p = t, as torch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.kernels._triton_common import is_interpreted

__all__ = ["INTERPRETED", "loss_backward", "loss_forward"]

#: vocabulary tile (4 warps, fp32: 16 values per thread per tile)
BLOCK_V = 2048


@triton.jit
def _loss_fwd_kernel(
    z_ptr, sz_row, sz_v,  # [M, V] drafter logits (rows = flattened block slots)
    t_ptr, st_row, st_v,  # [M, V] teacher probabilities p_t
    rows_ptr,  # [N] int64 evaluated rows
    label_ptr,  # [N] int64 ground-truth token of each evaluated row
    ce_ptr, l1_ptr, soft_ptr,  # [N] float32 out
    lse_ptr, sgn_ptr, tsum_ptr,  # [N] float32 out (for the backward): lse, S = Σ p·sign(p − t), Σt
    V,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0)
    row = tl.load(rows_ptr + n)
    z_row = z_ptr + row * sz_row
    t_row = t_ptr + row * st_row
    m = -float("inf")
    s = 0.0
    t_sum = 0.0
    tz = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        live = offs < V
        z = tl.load(z_row + offs * sz_v, mask=live, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + offs * st_v, mask=live, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        t_sum += tl.sum(t, axis=0)
        tz += tl.sum(t * tl.where(live, z, 0.0), axis=0)  # masked lanes: t = 0, z = −inf → 0, not NaN
    lse = m + tl.log(s)
    label = tl.load(label_ptr + n)
    z_label = tl.load(z_row + label * sz_v).to(tl.float32)

    l1 = 0.0
    sgn = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        live = offs < V
        z = tl.load(z_row + offs * sz_v, mask=live, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + offs * st_v, mask=live, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)  # masked lanes: exp(−inf) = 0 and t = 0, so they add nothing
        d = p - t
        l1 += tl.sum(tl.abs(d), axis=0)
        sgn += tl.sum(tl.where(d > 0, p, tl.where(d < 0, -p, 0.0)), axis=0)
    tl.store(ce_ptr + n, lse - z_label)
    tl.store(l1_ptr + n, l1)
    tl.store(soft_ptr + n, lse * t_sum - tz)
    tl.store(lse_ptr + n, lse)
    tl.store(sgn_ptr + n, sgn)
    tl.store(tsum_ptr + n, t_sum)


@triton.jit
def _loss_bwd_kernel(
    z_ptr, sz_row, sz_v,  # [M, V] drafter logits
    t_ptr, st_row, st_v,  # [M, V] p_t
    rows_ptr,  # [N] int64
    label_ptr,  # [N] int64
    lse_ptr, sgn_ptr, tsum_ptr,  # [N] float32 from the forward
    g_ce_ptr, g_l1_ptr, g_soft_ptr,  # [N] float32 upstream gradients
    dz_ptr, sd_row,  # [M, V] out (unit vocab stride; rows not evaluated are left as they are)
    V,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0)
    row = tl.load(rows_ptr + n)
    z_row = z_ptr + row * sz_row
    t_row = t_ptr + row * st_row
    dz_row = dz_ptr + row * sd_row
    label = tl.load(label_ptr + n)
    lse = tl.load(lse_ptr + n)
    sgn_sum = tl.load(sgn_ptr + n)
    t_sum = tl.load(tsum_ptr + n)
    g_ce = tl.load(g_ce_ptr + n)
    g_l1 = tl.load(g_l1_ptr + n)
    g_soft = tl.load(g_soft_ptr + n)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        live = offs < V
        z = tl.load(z_row + offs * sz_v, mask=live, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + offs * st_v, mask=live, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        d = p - t
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        grad = g_ce * (p - tl.where(offs == label, 1.0, 0.0))
        grad += g_l1 * p * (sign - sgn_sum)
        grad += g_soft * (t_sum * p - t)
        tl.store(dz_row + offs, grad.to(dz_ptr.dtype.element_ty), mask=live)


INTERPRETED = is_interpreted(_loss_fwd_kernel)


def loss_forward(
    logits: torch.Tensor,  # [M, V] float
    target_probs: torch.Tensor,  # [M, V] float
    rows: torch.Tensor,  # [N] int64
    labels: torch.Tensor,  # [N] int64
    block_v: int | None = None,
) -> tuple[torch.Tensor, ...]:  # ce, l1, soft, lse, S, Σt: each [N] float32
    n, v, block_v = rows.shape[0], logits.shape[1], block_v or BLOCK_V
    outs = torch.empty(6, n, dtype=torch.float32, device=logits.device)
    if n:
        _loss_fwd_kernel[(n,)](logits, *logits.stride(), target_probs, *target_probs.stride(), rows, labels,
                               *outs, v, BLOCK_V=block_v, num_warps=4)
    return tuple(outs)


def loss_backward(
    logits: torch.Tensor,  # [M, V] float
    target_probs: torch.Tensor,  # [M, V] float
    rows: torch.Tensor,  # [N] int64
    labels: torch.Tensor,  # [N] int64
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # lse, S, Σt [N]
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # g_ce, g_l1, g_soft [N] float32
    block_v: int | None = None,
) -> torch.Tensor:  # [M, V] ∂loss/∂logits (zero on rows not evaluated)
    dz = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    n, v, block_v = rows.shape[0], logits.shape[1], block_v or BLOCK_V
    if n:
        _loss_bwd_kernel[(n,)](logits, *logits.stride(), target_probs, *target_probs.stride(), rows, labels,
                               *saved, *grads, dz, dz.stride(0), v, BLOCK_V=block_v, num_warps=4)
    return dz
