"""Ragged verification of a batch of drafts: greedy matching and chain rejection sampling.

Same contract as :func:`dspark.platform.sampling.greedy_verify` / ``rejection_sample`` (the
references; see that module for the terms and the ragged layout). :func:`greedy_verify` and
:func:`rejection_sample` here dispatch (:mod:`dspark.kernels.dispatch`); the ``*_triton``
functions are the fast paths themselves, which ``sampling`` calls once it has decided.

The Triton path reads p_t and p_d where they lie (any strides and float dtype), gathers only the
two probabilities per draft, and streams the vocabulary once (twice at a rejection) for the final
token; given the same uniforms and Exp(1) noise its outputs are ``torch.equal`` to the reference.
"""

from __future__ import annotations

import torch

from dspark.kernels import dispatch
from dspark.kernels.rejection import reference

__all__ = ["greedy_verify", "greedy_verify_triton", "rejection_sample", "rejection_sample_triton"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _layout(cu_draft: torch.Tensor, num_drafts: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Validated ragged layout (the reference's checks and messages): (cu [R+1] on device, R, max ℓ)."""
    _check(cu_draft.ndim == 1 and cu_draft.shape[0] >= 1, f"cu_draft must be [R+1], got {list(cu_draft.shape)}")
    host = cu_draft.detach().to("cpu", torch.int64)  # tiny; the output width needs max ℓ on the host anyway
    lengths = host.diff()
    _check(
        int(host[0]) == 0 and int(host[-1]) == num_drafts and bool((lengths >= 0).all()),
        f"cu_draft must start at 0, be non-decreasing and end at D={num_drafts}, got {host.tolist()}",
    )
    r = host.shape[0] - 1
    return host.to(device), r, (int(lengths.max()) if r else 0)


def greedy_verify_triton(
    draft_tokens: torch.Tensor,  # [D] int64
    target_argmax: torch.Tensor,  # [D+R] int64
    cu_draft: torch.Tensor,  # [R+1] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] int64, output_tokens [R, max ℓ+1] int64 (-1 pad)
    """The Triton greedy verification (one program per request); outputs on ``draft_tokens.device``."""
    _check(draft_tokens.ndim == 1, f"draft_tokens must be [D], got {list(draft_tokens.shape)}")
    d, dev = draft_tokens.shape[0], draft_tokens.device
    cu, r, max_len = _layout(cu_draft, d, dev)
    _check(target_argmax.shape == (d + r,), f"target_argmax must be [D+R={d + r}], got {list(target_argmax.shape)}")
    kern = dispatch.load("rejection", draft_tokens)
    tok = draft_tokens.to(torch.int64).contiguous()
    tgt = target_argmax.to(dev, torch.int64).contiguous()
    return kern.greedy_verify(tok, tgt, cu, max_len)


def rejection_sample_triton(
    draft_tokens: torch.Tensor,  # [D] int64
    draft_probs: torch.Tensor,  # [D, V] float, p_d
    target_probs: torch.Tensor,  # [D+R, V] float, p_t
    cu_draft: torch.Tensor,  # [R+1] int64
    uniforms: torch.Tensor,  # [D] float32 in [0, 1)
    exp_noise: torch.Tensor,  # [R, V] Exp(1)
    *,
    block_v: int | None = None,  # vocabulary tile (tests use small ones to hit tile edges)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R] int64, output_tokens [R, max ℓ+1] int64 (-1 pad)
    """The Triton chain rejection sampler; outputs on ``target_probs.device``."""
    _check(draft_tokens.ndim == 1, f"draft_tokens must be [D], got {list(draft_tokens.shape)}")
    d = draft_tokens.shape[0]
    _check(target_probs.ndim == 2, f"target_probs must be [D+R, V], got {list(target_probs.shape)}")
    v, dev = target_probs.shape[1], target_probs.device
    cu, r, max_len = _layout(cu_draft, d, dev)
    _check(target_probs.shape == (d + r, v), f"target_probs must be [D+R={d + r}, V], got {list(target_probs.shape)}")
    _check(draft_probs.shape == (d, v), f"draft_probs must be [D={d}, V={v}], got {list(draft_probs.shape)}")
    _check(uniforms.shape == (d,), f"uniforms must be [D={d}], got {list(uniforms.shape)}")
    _check(exp_noise.shape == (r, v), f"exp_noise must be [R={r}, V={v}], got {list(exp_noise.shape)}")
    kern = dispatch.load("rejection", target_probs)
    # small per-draft vectors are moved/cast (as the reference does); the [*, V] tensors are read in place
    tok = draft_tokens.to(dev, torch.int64).contiguous()
    u = uniforms.to(dev, torch.float32).contiguous()
    extra = {} if block_v is None else {"block_v": block_v}
    return kern.rejection_sample(tok, draft_probs.to(dev), target_probs, cu, max_len, u, exp_noise.to(dev),
                                 reference.RESIDUAL_EPS, **extra)


def greedy_verify(
    draft_tokens: torch.Tensor,  # [D] int64
    target_argmax: torch.Tensor,  # [D+R] int64
    cu_draft: torch.Tensor,  # [R+1] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1] (-1 pad)
    """Dispatching entry point (Triton on CUDA, the reference elsewhere)."""
    if dispatch.use_triton(draft_tokens):
        return greedy_verify_triton(draft_tokens, target_argmax, cu_draft)
    return reference.greedy_verify(draft_tokens, target_argmax, cu_draft)


def rejection_sample(
    draft_tokens: torch.Tensor,  # [D] int64
    draft_probs: torch.Tensor,  # [D, V]
    target_probs: torch.Tensor,  # [D+R, V]
    cu_draft: torch.Tensor,  # [R+1] int64
    uniforms: torch.Tensor,  # [D]
    exp_noise: torch.Tensor,  # [R, V]
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1] (-1 pad)
    """Dispatching entry point (Triton on CUDA, the reference elsewhere)."""
    if dispatch.use_triton(target_probs):
        return rejection_sample_triton(draft_tokens, draft_probs, target_probs, cu_draft, uniforms, exp_noise)
    return reference.rejection_sample(draft_tokens, draft_probs, target_probs, cu_draft, uniforms, exp_noise)
