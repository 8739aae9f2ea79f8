"""The specification of the fused loss op: :func:`dspark.platform.training.objective.loss_terms`.

That function dispatches to the kernel itself when the dispatcher picks Triton; this wrapper pins
the reference so tests can compare values and gradients of both on the same inputs.
"""

from __future__ import annotations

import torch

from dspark.kernels import dispatch
from dspark.platform.training import objective

__all__ = ["loss_terms", "confidence_target"]


def loss_terms(
    logits: torch.Tensor,  # [..., V] float32 drafter logits
    target_probs: torch.Tensor,  # [..., V] float32 p_t
    labels: torch.Tensor,  # [...] int64
    eval_mask: torch.Tensor,  # [...] bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # ce, l1, soft [N]
    with dispatch.override("reference"):
        return objective.loss_terms(logits, target_probs, labels, eval_mask)


def confidence_target(l1: torch.Tensor) -> torch.Tensor:  # [N] -> [N] c* = clamp(1 − ½‖p_d − p_t‖₁, 0, 1), detached
    """The confidence head's target, as :func:`~dspark.platform.training.objective.loss_parts` forms it."""
    return (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
