"""The drafter interface every provider implements (DSpark, DFlash, EAGLE-3-style, MTP-1).

Notation (DSpark paper / DeepSpec): a request's committed text is x_0..x_{p-1}; the *anchor* is
the newest token x_p, which the target has not run yet. A drafter proposes a block of γ tokens
d_1..d_γ for positions p+1..p+γ, conditioned on the target's features of the committed tokens
(context strictly before the anchor) and on the anchor itself.

Context cache. A drafter owns, per *slot* (one running request), whatever it keeps of the target
features of committed tokens (DSpark: each draft layer's projected K/V of them). The engine
calls ``append_context`` with the features of newly committed tokens after every verify step,
``truncate`` to roll back, ``reset_slot`` when a request leaves and ``move_slot`` when it
compacts the running batch. Slots and lengths are the engine's; the drafter never guesses them.

Sampling inside ``propose`` uses :mod:`dspark.platform.sampling` with the request's own
parameters and generator, so the draft distribution ``p_d`` that rejection sampling needs is
exactly ``logits_to_probs(block.logits, ...)`` with the same parameters.

Training. ``train_forward`` runs, with grad, many blocks of whole training sequences at once
(one block per sampled anchor, :mod:`dspark.platform.training.objective`), teacher-forced on the
ground-truth tokens. Contract: for an anchor at position p whose labels are the tokens ``propose``
drafted there (after ``append_context`` of x_0..x_{p−1}), ``train_forward``'s logits at that anchor
equal ``propose``'s block logits and σ(its confidence logits) equal the uncalibrated confidences,
up to float tolerance — training optimises exactly what inference runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dspark.platform.sampling import SamplingBatch

__all__ = ["DraftBlock", "Drafter", "TrainOutputs", "check_train_inputs"]


@dataclass
class DraftBlock:
    tokens: torch.Tensor  # [R, γ] int64: sampled draft tokens d_1..d_γ
    logits: torch.Tensor  # [R, γ, V] float32: the logits d_k was sampled from (Markov bias included), before temperature
    confidences: torch.Tensor | None  # [R, γ] float32 in (0, 1): c_k = P(d_k accepted | d_<k accepted); None without a head


@dataclass
class TrainOutputs:
    """What ``train_forward`` returns for A blocks per sequence."""

    logits: torch.Tensor  # [B, A, γ, V] float32: slot logits, Markov bias on teacher-forced tokens
    confidence_logits: torch.Tensor | None  # [B, A, γ] float32: head logits z_k before calibration; None = no head


def check_train_inputs(
    input_ids: torch.Tensor,  # [B, S] int64
    features: torch.Tensor,  # [B, S, L·d]
    last_hidden: torch.Tensor,  # [B, S, d]
    anchors: torch.Tensor,  # [B, A] int64
    keep: torch.Tensor,  # [B, A] bool
    labels: torch.Tensor,  # [B, A, γ] int64
    block_size: int,  # γ
) -> None:
    """Raise ``ValueError`` naming the shapes when ``train_forward``'s inputs do not fit together."""
    b, s = input_ids.shape if input_ids.ndim == 2 else (-1, -1)
    a = anchors.shape[1] if anchors.ndim == 2 else -1
    ok = (
        input_ids.ndim == 2 and features.shape[:2] == (b, s) and features.ndim == 3
        and last_hidden.shape[:2] == (b, s) and last_hidden.ndim == 3
        and anchors.shape == (b, a) and keep.shape == (b, a) and labels.shape == (b, a, block_size)
    )
    if not ok:
        shapes = {n: list(t.shape) for n, t in dict(input_ids=input_ids, features=features, last_hidden=last_hidden,
                                                     anchors=anchors, keep=keep, labels=labels).items()}
        raise ValueError(f"train_forward inputs must be [B, S], [B, S, L·d], [B, S, d], [B, A], [B, A], "
                         f"[B, A, {block_size}]; got {shapes}")
    if s > 0 and anchors.numel() and bool((anchors < 0).any() | (anchors >= s).any()):
        raise ValueError(f"anchor positions must lie in 0..{s - 1}, got {anchors.min().item()}..{anchors.max().item()}")


class Drafter(nn.Module, abc.ABC):
    """One device, no parallelism inside; DeepSpeed / TP wrap it from outside."""

    #: γ, the number of tokens ``propose`` returns per request
    block_size: int

    # -- context cache (inference) -----------------------------------------------------------
    @abc.abstractmethod
    def allocate(self, max_slots: int, max_len: int) -> None:
        """(Re)allocate the context cache for ``max_slots`` requests of up to ``max_len`` tokens."""

    @abc.abstractmethod
    def append_context(
        self,
        slots: torch.Tensor,  # [R] int64
        tokens: torch.Tensor,  # [R, n] int64: the newly committed tokens (right-padded)
        features: torch.Tensor,  # [R, n, L*d] target features of those tokens
        last_hidden: torch.Tensor,  # [R, n, d] target final-norm hidden states of the same tokens
        lengths: torch.Tensor,  # [R] int64: valid rows per request (0 allowed)
    ) -> None:
        """Append the committed tokens (positions len..len+n_r-1 of each slot) and their target
        features to each slot's context. The anchor passed to the next ``propose`` is the token
        right after them."""

    @abc.abstractmethod
    def context_length(self, slot: int) -> int: ...

    @abc.abstractmethod
    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot's context back to its first ``length`` tokens."""

    @abc.abstractmethod
    def reset_slot(self, slot: int) -> None: ...

    @abc.abstractmethod
    def move_slot(self, src: int, dst: int) -> None:
        """Move slot ``src``'s context to ``dst`` (``dst``'s old content is dropped)."""

    # -- drafting ------------------------------------------------------------------------------
    @abc.abstractmethod
    def propose(
        self,
        slots: torch.Tensor,  # [R] int64
        anchors: torch.Tensor,  # [R] int64: the anchor token x_p of each request
        positions: torch.Tensor,  # [R] int64: p, the anchor's position (= the slot's context length)
        sampling: "SamplingBatch",
    ) -> DraftBlock:
        """Draft γ tokens per request (no grad)."""

    # -- training ------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64: training sequences x_0..x_{S−1}
        features: torch.Tensor,  # [B, S, L·d] the target's features of every position
        last_hidden: torch.Tensor,  # [B, S, d] the target's final-norm hidden states
        anchors: torch.Tensor,  # [B, A] int64: anchor POSITIONS p (the anchor token is x_p)
        keep: torch.Tensor,  # [B, A] bool: False = unused anchor slot (its outputs are garbage)
        labels: torch.Tensor,  # [B, A, γ] int64: x_{p+1}..x_{p+γ}, the teacher-forced block tokens
        *,
        detach_confidence: bool = False,
    ) -> TrainOutputs:
        """Draft every block with grad, as ``propose`` would at each anchor with context
        x_0..x_{p−1} (later positions are never seen) and the labels as the previous tokens of the
        sequential parts. ``detach_confidence`` feeds the confidence head detached inputs, so a
        confidence loss trains only the head."""
