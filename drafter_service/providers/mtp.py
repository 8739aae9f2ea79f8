"""MTP-1 baseline: one next-next-token layer in the DeepSeek-V3 multi-token-prediction style.

DeepSeek-V3 (arXiv 2412.19437, §2.2): with h_t the target's final-norm hidden state at position t
(``last_hidden``, what its LM head reads),

    u_t = eh_proj([hnorm(h_t) ; enorm(embed(x_{t+1}))]),  eh_proj = Linear(2d → d, no bias)

then one causal decoder layer with its own KV, the final norm and the frozen LM head predict
x_{t+2}. At serving time this drafts exactly ONE token per step: ``block_size`` is forced to 1
whatever the config says (the checkpoint records 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dspark.drafter_service.layers import RMSNorm
from dspark.drafter_service.providers.autoregressive import AutoregressiveDrafter
from dspark.platform.config import DrafterConfig

__all__ = ["MTPDrafter"]


class MTPDrafter(AutoregressiveDrafter):
    def __init__(self, cfg: DrafterConfig, target: Any):
        super().__init__(cfg.model_copy(update={"block_size": 1}), target)
        d, eps = self.spec.hidden_size, self.spec.rms_norm_eps
        self.hnorm = RMSNorm(d, eps)
        self.enorm = RMSNorm(d, eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self._finalize(target)

    def context_feature(
        self,
        features: torch.Tensor,  # [..., L·d] (unused)
        last_hidden: torch.Tensor,  # [..., d]
    ) -> torch.Tensor:  # [..., d]
        return last_hidden

    def pair_input(
        self,
        feat: torch.Tensor,  # [..., d]
        emb: torch.Tensor,  # [..., d]
    ) -> torch.Tensor:  # [..., d]
        return self.eh_proj(torch.cat([self.hnorm(feat), self.enorm(emb)], dim=-1))
