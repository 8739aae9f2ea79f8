"""Shared machinery of the autoregressive baselines (EAGLE-3-style, MTP-1).

One causal decoder layer runs over *pair inputs*: position t holds

    u_t = combine(f_t, embed(x_{t+1}))

where f_t ``[d]`` is a feature of position t (EAGLE-3: fused low/mid/high target features;
MTP-1: the target's final-norm hidden state) and x_{t+1} the NEXT token — EAGLE's pairing. The
layer's output o_t (pre-norm) → final norm → frozen LM head predicts x_{t+2}.

Pending pair. After ``append_context`` of x_0..x_{n−1} the pairs t = 0..n−2 are complete; f_{n−1}
waits for x_n, which is the anchor of the next ``propose`` (the anchor always becomes committed).
So the cache holds, per slot:

* K/V of the complete pairs (rows 0..n−2, i.e. ``max(n−1, 0)`` rows) — computed once at append;
* the features f_0..f_{n−1} (``[max_slots, max_len, d]``), so that any ``truncate`` can re-pend
  f_{n−1} and an append can complete the pending pair with its first new token.

``propose`` (γ steps, nothing written to the cache): step 1 completes the pending pair
(f_{p−1}, x_p) at position p−1 and predicts d_1; step j > 1 uses (o_{j−1}, d_{j−1}) at position
p−2+j — the drafter's own output hidden stands in for the target feature it does not have
(EAGLE's feature re-use). With an empty context, f_{−1} is a zero vector at position −1
(RoPE only sees position differences).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import torch

from dspark.drafter_service.base import DraftBlock, TrainOutputs, check_train_inputs
from dspark.drafter_service.layers import ContextKV, DecoderLayer, RMSNorm, rope_cos_sin
from dspark.drafter_service.markov import ConfidenceHead
from dspark.drafter_service.providers import TargetBoundDrafter, sample_step
from dspark.platform.config import DrafterConfig

if TYPE_CHECKING:
    from dspark.platform.sampling import SamplingBatch

__all__ = ["AutoregressiveDrafter"]


class AutoregressiveDrafter(TargetBoundDrafter):
    """Base of EAGLE-3-style and MTP-1: subclasses add their modules, implement the two hooks
    below and call ``self._finalize(target)``."""

    def __init__(self, cfg: DrafterConfig, target: Any):
        super().__init__(cfg, target)
        spec, d = self.spec, self.spec.hidden_size
        self.layer = DecoderLayer(spec)
        self.norm = RMSNorm(d, spec.rms_norm_eps)
        self.confidence = ConfidenceHead(d) if cfg.confidence_head else None
        self.kv: ContextKV | None = None
        self.feats: torch.Tensor | None = None  # [max_slots, max_len, d] f_t of committed tokens
        self.ctx_len = torch.zeros(0, dtype=torch.int64)  # [max_slots] committed tokens per slot (CPU)

    # -- provider hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def context_feature(
        self,
        features: torch.Tensor,  # [..., L·d] target features
        last_hidden: torch.Tensor,  # [..., d] target final-norm hidden states
    ) -> torch.Tensor:  # [..., d] f_t
        ...

    @abc.abstractmethod
    def pair_input(
        self,
        feat: torch.Tensor,  # [..., d] f_t (or the drafter's own o_t for drafted positions)
        emb: torch.Tensor,  # [..., d] embed(x_{t+1})
    ) -> torch.Tensor:  # [..., d] u_t
        ...

    # -- shared pieces --------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, s] -> [B, s, hd] ×2
        return rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta, self.dtype)

    def pair_kv(
        self,
        u: torch.Tensor,  # [B, s, d] pair inputs
        positions: torch.Tensor,  # [B, s] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # K, V [B, kv_heads, s, hd]
        """The keys/values the layer itself computes for these pairs (what the cache stores)."""
        return self.layer.self_attn.project_kv(self.layer.input_layernorm(u), *self._rope(positions))

    def _pending_feature(self, slots_c: torch.Tensor) -> torch.Tensor:  # [R] (CPU) -> [R, d]
        c = self.ctx_len[slots_c]
        f = self.feats[slots_c.to(self.device), (c - 1).clamp(min=0).to(self.device)]
        return f * (c > 0).to(self.device, f.dtype)[:, None]

    # -- context cache --------------------------------------------------------------------------
    def allocate(self, max_slots: int, max_len: int) -> None:
        s = self.spec
        self.kv = ContextKV(1, s.num_kv_heads, s.head_dim, self.dtype, self.device)
        self.kv.allocate(max_slots, max_len)
        self.feats = torch.zeros(max_slots, max_len, s.hidden_size, dtype=self.dtype, device=self.device)
        self.ctx_len = torch.zeros(max_slots, dtype=torch.int64)

    @torch.no_grad()
    def append_context(self, slots, tokens, features, last_hidden, lengths) -> None:
        self._require_cache()
        r, n = tokens.shape
        assert features.shape[:2] == last_hidden.shape[:2] == tokens.shape, (features.shape, tokens.shape)
        if n == 0:
            return
        slots_c, counts = slots.cpu(), lengths.cpu().to(torch.int64)
        c = self.ctx_len[slots_c]  # [R] committed before this append
        if bool((c + counts > self.feats.shape[1]).any()):
            raise ValueError(f"append would exceed the context cache's max_len {self.feats.shape[1]}")
        dev = self.device
        f_new = self.context_feature(features.to(dev, self.dtype), last_hidden.to(dev, self.dtype))  # [R, n, d]
        # pair j = (f_{c−1+j}, x_{c+j}) at position c−1+j: the pending feature, then the new ones
        pair_f = torch.cat([self._pending_feature(slots_c)[:, None], f_new[:, :-1]], dim=1)[:, :n]
        u = self.pair_input(pair_f, self.embed(tokens.to(dev)))  # [R, n, d]
        pos = (c[:, None] - 1 + torch.arange(n)[None]).to(dev)
        k, v = self.pair_kv(u, pos)  # [R, kv_heads, n, hd]
        # an empty slot has no pending feature: its pair 0 is not real, shift its rows left by one
        empty = (c == 0).to(dev)[:, None, None, None]
        k = torch.where(empty, k.roll(-1, dims=2), k)
        v = torch.where(empty, v.roll(-1, dims=2), v)
        self.kv.append(slots, k[None], v[None], torch.where(c > 0, counts, (counts - 1).clamp(min=0)))
        valid = torch.arange(n)[None] < counts[:, None]  # [R, n]
        r_idx, j_idx = valid.nonzero(as_tuple=True)
        self.feats[slots_c[r_idx].to(dev), (c[r_idx] + j_idx).to(dev)] = f_new[r_idx.to(dev), j_idx.to(dev)]
        self.ctx_len[slots_c] = c + counts

    def context_length(self, slot: int) -> int:
        return int(self.ctx_len[slot]) if self.kv is not None else 0

    def _require_cache(self) -> None:
        if self.kv is None:
            raise RuntimeError("context cache not allocated: call allocate(max_slots, max_len) first")

    def truncate(self, slot: int, length: int) -> None:
        self._require_cache()
        if not 0 <= length <= self.context_length(slot):
            raise ValueError(f"cannot truncate slot {slot} of length {self.context_length(slot)} to {length}")
        self.ctx_len[slot] = length
        self.kv.truncate(slot, max(length - 1, 0))

    def reset_slot(self, slot: int) -> None:
        self._require_cache()
        self.ctx_len[slot] = 0
        self.kv.reset(slot)

    def move_slot(self, src: int, dst: int) -> None:
        self._require_cache()
        if src == dst:
            return
        n = int(self.ctx_len[src])
        self.feats[dst, :n] = self.feats[src, :n]
        self.ctx_len[dst], self.ctx_len[src] = n, 0
        self.kv.move(src, dst)

    # -- drafting -------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, slots, anchors, positions, sampling: "SamplingBatch") -> DraftBlock:
        self._require_cache()
        slots_c = slots.cpu()
        c = self.ctx_len[slots_c]  # [R]
        self._check_positions(positions, c)
        dev = self.device
        ctx_k, ctx_v, valid = self.kv.gather(slots)  # [1, R, kv_heads, P, hd], valid [R, P]
        ctx_k, ctx_v = ctx_k[0], ctx_v[0]
        r = slots.shape[0]
        feat, tok = self._pending_feature(slots_c), anchors.to(dev, torch.int64)
        pos0 = c.to(dev) - 1  # position of the pending pair
        tokens, logits, conf = [], [], []
        for j in range(self.block_size):
            u = self.pair_input(feat, self.embed(tok))[:, None]  # [R, 1, d]
            pos = (pos0 + j)[:, None]  # [R, 1]
            k_j, v_j = self.pair_kv(u, pos)
            # attend to the slot's valid context rows, the earlier drafted pairs, and itself
            mask = torch.cat([valid, torch.ones(r, j + 1, dtype=torch.bool, device=dev)], dim=1)[:, None, None]
            o = self.layer(u, *self._rope(pos), (ctx_k, ctx_v), mask)  # [R, 1, d]
            ctx_k, ctx_v = torch.cat([ctx_k, k_j], dim=2), torch.cat([ctx_v, v_j], dim=2)
            h = self.norm(o[:, 0])
            step = self.lm_head(h).float()  # [R, V]
            if self.confidence is not None:
                conf.append(self.calibrated_confidence(self.confidence(h), j))
            tok = sample_step(step, sampling, j)
            tokens.append(tok)
            logits.append(step)
            feat = o[:, 0]
        confidences = torch.stack(conf, dim=1) if conf else None
        return DraftBlock(torch.stack(tokens, dim=1), torch.stack(logits, dim=1), confidences)

    # -- training -------------------------------------------------------------------------------
    def train_forward(self, input_ids, features, last_hidden, anchors, keep, labels, *, detach_confidence=False):
        """The training-time test, unrolled as ``propose`` runs it, for all anchors at once.

        Step 1 is one causal pass over the sequence's pairs: pair j = (f_{j−1}, x_j) at position
        j−1, with j = 0 the empty-context pair (f_{−1} = 0), which only sees itself — so pair p is
        step 1 of the block at anchor p. Step k > 1 of that block is (o_{k−1}, labels_{k−1}) at
        position p−2+k and sees pairs 1..p (pair 0 alone when p = 0) plus the block's own earlier
        steps, never another block's. ``keep`` is not needed.
        """
        check_train_inputs(input_ids, features, last_hidden, anchors, keep, labels, self.block_size)
        (b, s), a, g, dev = input_ids.shape, anchors.shape[1], self.block_size, self.device
        ids, anchors, labels = input_ids.to(dev), anchors.to(dev, torch.int64), labels.to(dev)
        f = self.context_feature(features.to(dev, self.dtype), last_hidden.to(dev, self.dtype))  # [B, S, d]
        u = self.pair_input(torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1), self.embed(ids))  # [B, S, d]
        pos = (torch.arange(s, device=dev) - 1).expand(b, s)  # [B, S]
        j = torch.arange(s, device=dev)
        causal = (j[None] <= j[:, None]) & ((j[None] >= 1) | (j[None] == j[:, None]))  # [S (query), S (key)]
        o = self.layer(u, *self._rope(pos), None, causal.expand(b, 1, s, s))  # [B, S, d]
        keys, values = self.pair_kv(u, pos)  # [B, kv_heads, S, hd]
        feat = o.gather(1, anchors[..., None].expand(-1, -1, o.shape[-1]))  # [B, A, d] o_1 of each block
        outs = [feat]
        seen = (j <= anchors[..., None]) & ((j >= 1) | (anchors[..., None] == 0))  # [B, A, S]
        own = torch.eye(a, dtype=torch.bool, device=dev).expand(b, a, a)  # [B, A, A]
        for k in range(1, g):
            u_k = self.pair_input(feat, self.embed(labels[:, :, k - 1]))  # [B, A, d]
            pos_k = anchors - 1 + k  # [B, A]
            mask = torch.cat([seen] + [own] * k, dim=-1)[:, None]  # [B, 1, A, S + k·A]
            feat = self.layer(u_k, *self._rope(pos_k), (keys, values), mask)  # [B, A, d]
            k_k, v_k = self.pair_kv(u_k, pos_k)
            keys, values = torch.cat([keys, k_k], dim=2), torch.cat([values, v_k], dim=2)
            outs.append(feat)
        h = self.norm(torch.stack(outs, dim=2))  # [B, A, γ, d]
        logits = self.lm_head(h).float()  # [B, A, γ, V]
        conf = None
        if self.confidence is not None:
            conf = self.confidence(h.detach() if detach_confidence else h)  # [B, A, γ]
        return TrainOutputs(logits, conf)
