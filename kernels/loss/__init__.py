"""The drafter training loss over the vocabulary, fused: per evaluated block slot
L_ce = −log p_d(x), L1 = ‖p_d − p_t‖₁ and soft CE −Σ p_t·log p_d, with p_d = softmax(z).

* :func:`loss_terms` — the op (dispatching), ``(logits [..., V], p_t [..., V], labels [...],
  eval_mask [...]) → (ce, l1, soft)``, each ``[N]`` over the evaluated slots in row-major order,
  differentiable in ``logits``. Reference: :func:`dspark.platform.training.objective.loss_terms`
  (which routes to :func:`loss_terms_triton` itself when the dispatcher picks Triton).
* The confidence target c* = clamp(1 − ½·L1, 0, 1) (:func:`.reference.confidence_target`) is
  one elementwise op on the returned ``l1`` (detached), as ``loss_parts`` forms it.

The Triton path is a :class:`torch.autograd.Function`: the forward streams each evaluated row's
logits and p_t in vocabulary tiles with an online softmax and keeps only [N]-sized statistics;
the backward recomputes p tile by tile and writes ∂/∂logits straight into the gradient of the
full ``[..., V]`` logits (rows not evaluated stay zero). No ``[N, V]`` copy of either input, no
softmax, log-softmax or |p_d − p_t| tensor is materialised. p_t is treated as a constant (the
teacher is run under ``no_grad``); a ``target_probs`` that requires grad takes the reference.
"""

from __future__ import annotations

import torch

from dspark.kernels import dispatch
from dspark.kernels.loss import reference

__all__ = ["loss_terms", "loss_terms_triton"]


class _FusedLossTerms(torch.autograd.Function):
    """(ce, l1, soft) [N] of rows ``rows`` of ``logits`` [M, V]; gradient for ``logits`` only."""

    @staticmethod
    def forward(ctx, logits, target_probs, rows, labels, block_v):  # noqa: D401 (autograd signature)
        kern = dispatch.load("loss", logits)
        ce, l1, soft, lse, sgn, t_sum = kern.loss_forward(logits, target_probs, rows, labels, block_v)
        ctx.save_for_backward(logits, target_probs, rows, labels, lse, sgn, t_sum)
        ctx.block_v = block_v
        return ce, l1, soft

    @staticmethod
    def backward(ctx, g_ce, g_l1, g_soft):
        logits, target_probs, rows, labels, lse, sgn, t_sum = ctx.saved_tensors
        kern = dispatch.load("loss", logits)
        grads = tuple(
            (g.float().contiguous() if g is not None else torch.zeros_like(lse)) for g in (g_ce, g_l1, g_soft)
        )
        dz = kern.loss_backward(logits, target_probs, rows, labels, (lse, sgn, t_sum), grads, ctx.block_v)
        return dz, None, None, None, None


def loss_terms_triton(
    logits: torch.Tensor,  # [..., V] float drafter logits
    target_probs: torch.Tensor,  # [..., V] float p_t (no grad)
    labels: torch.Tensor,  # [...] int64
    eval_mask: torch.Tensor,  # [...] bool
    *,
    block_v: int | None = None,  # vocabulary tile (tests use small ones to hit tile edges)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # ce, l1, soft [N] float32
    """The Triton implementation (forward and backward kernels)."""
    if logits.shape != target_probs.shape or logits.ndim < 1:
        raise ValueError(f"logits and target_probs must be [..., V] alike, got {list(logits.shape)}, {list(target_probs.shape)}")
    if labels.shape != logits.shape[:-1] or eval_mask.shape != logits.shape[:-1]:
        raise ValueError(f"labels / eval_mask must be {list(logits.shape[:-1])}, got {list(labels.shape)}, {list(eval_mask.shape)}")
    v = logits.shape[-1]
    dev = logits.device
    # [..., V] -> [M, V] views for contiguous inputs; the kernels take any row / vocab strides
    z2 = logits.reshape(-1, v)
    t2 = target_probs.reshape(-1, v).to(dev)
    keep = eval_mask.reshape(-1).to(dev)
    rows = keep.nonzero().squeeze(1)  # [N] row-major, the order of logits[eval_mask]
    lab = labels.reshape(-1).to(dev, torch.int64)[rows].contiguous()
    return _FusedLossTerms.apply(z2, t2, rows, lab, block_v)


def loss_terms(
    logits: torch.Tensor,  # [..., V] float
    target_probs: torch.Tensor,  # [..., V] float
    labels: torch.Tensor,  # [...] int64
    eval_mask: torch.Tensor,  # [...] bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # ce, l1, soft [N]
    """Dispatching entry point (Triton on CUDA, the reference elsewhere)."""
    if dispatch.use_triton(logits) and not target_probs.requires_grad:
        return loss_terms_triton(logits, target_probs, labels, eval_mask)
    return reference.loss_terms(logits, target_probs, labels, eval_mask)
