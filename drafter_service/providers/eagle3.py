"""EAGLE-3-style baseline: one autoregressive layer fed by fused low/mid/high target features.

EAGLE-3 (Li et al. 2025, arXiv 2503.01840) in the simplified form this project trains:

* f_t = fc([F_t^low ; F_t^mid ; F_t^high]) with fc = Linear(3d → d, no bias); low/mid/high are the
  first, middle and last of the target's feature layers (``layer_ids``; with fewer than three
  feature layers some are repeated);
* u_t = fuse([embed(x_{t+1}) ; f_t]) with fuse = Linear(2d → d, no bias), then one causal decoder
  layer, the final norm and the frozen LM head (:mod:`.autoregressive` has the cache and drafting);
* drafted positions feed the layer's own output hidden in place of f_t ("training-time test").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dspark.drafter_service.providers.autoregressive import AutoregressiveDrafter
from dspark.platform.config import DrafterConfig

__all__ = ["Eagle3Drafter"]


class Eagle3Drafter(AutoregressiveDrafter):
    def __init__(self, cfg: DrafterConfig, target: Any):
        super().__init__(cfg, target)
        d, n_feat = self.spec.hidden_size, len(target.layer_ids)
        #: which of the concatenated feature layers are low / mid / high
        self.feature_index = (0, n_feat // 2, n_feat - 1)
        self.fc = nn.Linear(3 * d, d, bias=False)
        self.fuse = nn.Linear(2 * d, d, bias=False)
        self._finalize(target)

    def context_feature(
        self,
        features: torch.Tensor,  # [..., L·d]
        last_hidden: torch.Tensor,  # [..., d] (unused)
    ) -> torch.Tensor:  # [..., d]
        d = self.spec.hidden_size
        width = len(self.identity["layer_ids"]) * d
        if features.shape[-1] != width:
            raise ValueError(f"target features must have width {width} (L·d), got {features.shape[-1]}")
        parts = [features[..., i * d : (i + 1) * d] for i in self.feature_index]
        return self.fc(torch.cat(parts, dim=-1))

    def pair_input(
        self,
        feat: torch.Tensor,  # [..., d]
        emb: torch.Tensor,  # [..., d]
    ) -> torch.Tensor:  # [..., d]
        return self.fuse(torch.cat([emb, feat], dim=-1))
