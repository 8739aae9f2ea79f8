"""The specification of the rejection op: :mod:`dspark.platform.sampling`'s pure functions.

``greedy_verify`` / ``rejection_sample`` there dispatch to the Triton kernels themselves when the
dispatcher picks Triton; these wrappers pin the reference so tests can compare both on the same
inputs whatever the active mode.
"""

from __future__ import annotations

import torch

from dspark.kernels import dispatch
from dspark.platform import sampling

__all__ = ["RESIDUAL_EPS", "greedy_verify", "rejection_sample"]

RESIDUAL_EPS = sampling.RESIDUAL_EPS


def greedy_verify(
    draft_tokens: torch.Tensor,  # [D] int64
    target_argmax: torch.Tensor,  # [D+R] int64
    cu_draft: torch.Tensor,  # [R+1] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1] (-1 pad)
    with dispatch.override("reference"):
        return sampling.greedy_verify(draft_tokens, target_argmax, cu_draft)


def rejection_sample(
    draft_tokens: torch.Tensor,  # [D] int64
    draft_probs: torch.Tensor,  # [D, V]
    target_probs: torch.Tensor,  # [D+R, V]
    cu_draft: torch.Tensor,  # [R+1] int64
    uniforms: torch.Tensor,  # [D]
    exp_noise: torch.Tensor,  # [R, V]
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [R], output_tokens [R, max ℓ+1] (-1 pad)
    with dispatch.override("reference"):
        return sampling.rejection_sample(draft_tokens, draft_probs, target_probs, cu_draft, uniforms, exp_noise)
