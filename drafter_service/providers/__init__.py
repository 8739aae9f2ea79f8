"""Drafter providers: DSpark/DFlash (:mod:`.dspark`), EAGLE-3-style (:mod:`.eagle3`) and MTP-1
(:mod:`.mtp`), the last two on the shared autoregressive machinery of :mod:`.autoregressive`.

This module holds what every provider shares: :class:`TargetBoundDrafter` (the drafter's config,
layer shapes and target identity, the frozen embedding / LM head copies, device helpers) and
:func:`sample_step` (one draft token per request with the request's own sampling parameters and
generator, through :mod:`dspark.platform.sampling`, so ``p_d = logits_to_probs(logits, ...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dspark.drafter_service.base import Drafter
from dspark.drafter_service.layers import LayerSpec, frozen_embed_and_head, init_linear, target_identity
from dspark.platform.config import DrafterConfig
from dspark.platform.sampling import logits_to_probs, sample_from_probs

if TYPE_CHECKING:
    from dspark.platform.sampling import SamplingBatch

__all__ = ["DrafterBuildError", "TargetBoundDrafter", "sample_step"]


class DrafterBuildError(ValueError):
    """A drafter cannot be built for this target (message is meant for users)."""


def sample_step(
    logits: torch.Tensor,  # [R, V] float32: corrected draft logits (before temperature)
    sampling: "SamplingBatch",  # R requests
    slot: int,  # block slot k (0-based): the token at output index offsets[r] + k
) -> torch.Tensor:  # [R] int64
    """Draw one token per request from ``logits_to_probs(logits, request params)``; greedy rows
    (T = 0) get the argmax. Row r's noise is request r's own: E(key, offset + slot) for keyed rows
    (the noise the verifier uses for that position, so the draft is coupled to the target's
    token), the next draw of its generator otherwise."""
    assert logits.ndim == 2 and logits.shape[0] == len(sampling), (logits.shape, len(sampling))
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return sample_from_probs(probs, sampling.exponentials(logits.shape[-1], logits.device, step=slot))


class TargetBoundDrafter(Drafter):
    """Common state of every provider built for one target.

    Subclasses build their trainable modules after ``super().__init__`` and then call
    :meth:`_finalize`, which initialises them (normal(0, initializer_range)), moves them to the
    target's device and dtype and attaches the frozen ``embed`` / ``lm_head`` copies.
    """

    mask_token_id: int | None = None

    def __init__(self, cfg: DrafterConfig, target: Any):
        super().__init__()
        self.cfg = cfg
        self.block_size = int(cfg.block_size)
        # STS temperatures T_k of the confidence head (ones = uncalibrated); a persistent buffer,
        # so it travels in the checkpoint with the weights (see calibrated_confidence)
        self.register_buffer("confidence_temperature", torch.ones(self.block_size, dtype=torch.float32))
        self.spec = LayerSpec.from_hf_config(target.config)
        self.identity = target_identity(target)
        self.vocab_size = int(target.vocab_size)
        if self.spec.hidden_size != target.hidden_size:
            raise DrafterBuildError(f"config hidden_size {self.spec.hidden_size} != target width {target.hidden_size}")

    def _finalize(self, target: Any) -> None:
        init_linear(self, self.spec.init_std)
        self.to(device=target.device, dtype=target.dtype)
        self.confidence_temperature = self.confidence_temperature.float()  # T_k stays float32 in bf16 drafters
        self.embed, self.lm_head = frozen_embed_and_head(target)

    def calibrated_confidence(
        self,
        logits: torch.Tensor,  # [R] float32: confidence-head logits z_k of block position k
        k: int,  # 0-based block position
    ) -> torch.Tensor:  # [R] float32 c_k = σ(z_k / T_k)
        """Sequential Temperature Scaling (DSpark paper §3.2.1): the head's logit divided by the
        position's fitted temperature (``confidence_temperature``, ones until ``dspark calibrate``
        fits it), so every consumer of ``DraftBlock.confidences`` sees calibrated values."""
        return torch.sigmoid(logits.float() / self.confidence_temperature[k])

    def set_confidence_temperature(self, temperatures) -> None:
        """Install STS temperatures (a sequence or tensor of γ positive finite floats)."""
        t = torch.as_tensor(temperatures, dtype=torch.float32).reshape(-1)
        if t.numel() != self.block_size or not bool(torch.isfinite(t).all() and (t > 0).all()):
            raise ValueError(f"need {self.block_size} positive finite confidence temperatures, got {t.tolist()}")
        self.confidence_temperature.copy_(t.to(self.confidence_temperature.device))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @staticmethod
    def _check_features(features: torch.Tensor, width: int) -> None:
        """``features`` ``[R, n, L·d]`` must carry the target's hooked layers (a target run with
        ``with_features=False`` gives width 0)."""
        if features.ndim != 3 or features.shape[-1] != width:
            raise ValueError(f"target features must be [R, n, {width}], got {list(features.shape)}")

    @staticmethod
    def _check_positions(positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """``positions`` must equal the slots' context lengths; checked only when it is on the
        host (no device sync on the serving path)."""
        if positions.device.type == "cpu" and not torch.equal(positions.to(torch.int64), lengths):
            raise ValueError(
                f"anchor positions {positions.tolist()} differ from the slots' context lengths {lengths.tolist()}"
            )
