"""DSpark (and DFlash = DSpark with ``markov_rank`` 0): a parallel block drafter.

DSpark paper §3.1 / DeepSpec ``modeling/dspark``. Per request with committed tokens x_0..x_{p−1}
and anchor x_p (position p, not yet run by the target):

1. Context: the target features F_t ``[L·d]`` of committed tokens t < p are fused,
   c_t = hidden_norm(fc(F_t)) ``[d]``, and every draft layer projects them with ITS OWN k_proj /
   v_proj (then k_norm and RoPE at position t). Those K/V rows are what the context cache stores;
   the context never enters the residual stream.
2. Block: inputs [x_p, MASK×(γ−1)] at positions p..p+γ−1 run through N Qwen3-style layers whose
   keys/values are [context ; block]; queries are block tokens only, bidirectional inside the
   block (:func:`block_attention_mask`). Final norm → h_k, base logits U_k = lm_head(h_k).
   Slot k (1-based) predicts the token at position p+k.
3. Sequential head, left to right: logits_k = U_k + B_k(d_{k−1}) (d_0 = x_p), d_k sampled from
   ``logits_to_probs(logits_k, request params)``, confidence c_k = σ(conf([h_k ; W1[d_{k−1}]]) / T_k)
   with T_k the STS temperature (ones until calibrated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dspark.drafter_service.base import DraftBlock, TrainOutputs, check_train_inputs
from dspark.drafter_service.layers import ContextKV, DecoderLayer, RMSNorm, rope_cos_sin
from dspark.drafter_service.markov import ConfidenceHead, build_markov_head
from dspark.drafter_service.providers import DrafterBuildError, TargetBoundDrafter, sample_step
from dspark.platform.config import DrafterConfig

if TYPE_CHECKING:
    from dspark.platform.sampling import SamplingBatch

__all__ = ["DSparkDrafter", "block_attention_mask", "resolve_mask_token_id"]


def block_attention_mask(
    anchor_pos: torch.Tensor,  # [B, nb] int64: anchor position of each block (= its context length)
    ctx_len: int,  # P: context keys at positions 0..P−1 come first in the key axis
    block_size: int,  # γ
) -> torch.Tensor:  # [B, 1, nb·γ, P + nb·γ] bool, True = attend
    """DSpark attention mask for nb blocks of one sequence (training) or one block per request
    (inference, nb = 1, P = the batch's longest context).

    A query of block b sees context key j iff j < anchor_pos[b] (strictly before its anchor) and
    every token of its own block (bidirectional); never another block. No row is fully masked.

    Example: anchor_pos = [[2, 3]], P = 4, γ = 2 → rows (queries) over keys [c0 c1 c2 c3 | b0 b0 b1 b1]:
    block 0: [1 1 0 0 | 1 1 0 0] ×2; block 1: [1 1 1 0 | 0 0 1 1] ×2.
    """
    assert anchor_pos.ndim == 2, anchor_pos.shape
    b, nb = anchor_pos.shape
    dev = anchor_pos.device
    q_block = torch.arange(nb * block_size, device=dev) // block_size  # [Q]
    ctx = torch.arange(ctx_len, device=dev)[None, None] < anchor_pos[:, q_block, None]  # [B, Q, P]
    own = (q_block[:, None] == q_block[None, :]).expand(b, -1, -1)  # [B, Q, Q]
    return torch.cat([ctx, own], dim=-1)[:, None]


def resolve_mask_token_id(target: Any, mask_token: str, explicit: int | None) -> int:
    """The block-filler id: the target tokenizer's id of ``mask_token``; ``explicit`` when the target
    has no tokenizer or lacks the token (if both exist they must agree)."""
    tok = getattr(target, "tokenizer", None)
    found = tok.get_vocab().get(mask_token) if tok is not None else None
    if explicit is not None:
        if found is not None and int(found) != int(explicit):
            raise DrafterBuildError(
                f"mask_token_id {explicit} disagrees with the target tokenizer's id {found} for {mask_token!r}"
            )
        mid = int(explicit)
    elif found is not None:
        mid = int(found)
    else:
        why = "the target has no tokenizer" if tok is None else f"the target tokenizer has no token {mask_token!r}"
        raise DrafterBuildError(
            f"cannot find the DSpark mask token: {why}. Add {mask_token!r} to the tokenizer, set "
            "drafter.mask_token to a token it has, or pass mask_token_id explicitly."
        )
    if not 0 <= mid < int(target.vocab_size):
        raise DrafterBuildError(f"mask_token_id {mid} is outside the target vocabulary (size {target.vocab_size})")
    return mid


class DSparkDrafter(TargetBoundDrafter):
    """DSpark block drafter; with ``markov_rank`` 0 it is DFlash (no sequential bias)."""

    def __init__(self, cfg: DrafterConfig, target: Any, mask_token_id: int):
        super().__init__(cfg, target)
        spec, d = self.spec, self.spec.hidden_size
        self.mask_token_id = int(mask_token_id)
        self.fc = nn.Linear(target.feature_dim, d, bias=False)  # L·d → d feature fusion
        self.hidden_norm = RMSNorm(d, spec.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, spec.rms_norm_eps)
        self.markov = build_markov_head(cfg.markov_head_type, self.vocab_size, cfg.markov_rank, d)
        with_markov = cfg.confidence_with_markov and self.markov is not None
        self.confidence = ConfidenceHead(d, cfg.markov_rank if with_markov else 0) if cfg.confidence_head else None
        self._finalize(target)
        self.kv = ContextKV(cfg.num_layers, spec.num_kv_heads, spec.head_dim, self.dtype, self.device)

    # -- backbone (shared with training) --------------------------------------------------------
    def project_context(
        self,
        features: torch.Tensor,  # [B, S, L·d] target features of context tokens
        positions: torch.Tensor,  # [B, S] int64 their positions
    ) -> tuple[torch.Tensor, torch.Tensor]:  # K, V [n_layers, B, kv_heads, S, hd]
        ctx = self.hidden_norm(self.fc(features.to(self.dtype)))
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta, self.dtype)
        kvs = [layer.self_attn.project_kv(ctx, cos, sin) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])

    def backbone(
        self,
        x: torch.Tensor,  # [B, Q, d] block-token embeddings
        positions: torch.Tensor,  # [B, Q] int64
        ctx_k: torch.Tensor,  # [n_layers, B, kv_heads, P, hd] from project_context / the cache
        ctx_v: torch.Tensor,  # [n_layers, B, kv_heads, P, hd]
        mask: torch.Tensor,  # [B, 1, Q, P + Q] bool (block_attention_mask)
    ) -> torch.Tensor:  # [B, Q, d] final-normed hidden states h
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta, self.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, (ctx_k[i], ctx_v[i]), mask)
        return self.norm(x)

    def block_input_ids(self, anchors: torch.Tensor) -> torch.Tensor:  # [R] -> [R, γ]
        masks = torch.full((anchors.shape[0], self.block_size - 1), self.mask_token_id, dtype=torch.int64, device=anchors.device)
        return torch.cat([anchors[:, None].to(torch.int64), masks], dim=1)

    def sample_block(
        self,
        h: torch.Tensor,  # [R, γ, d]
        base_logits: torch.Tensor,  # [R, γ, V] float32 U
        anchors: torch.Tensor,  # [R] int64
        sampling: "SamplingBatch",
    ) -> DraftBlock:
        """The left-to-right Markov loop of paper §3.1 (stage 2) plus the confidence head."""
        # Fast path: dspark.kernels.markov runs the whole loop (bias, sampling) in one Triton launch
        # when the kernel dispatcher picks Triton (CUDA by default) and the head / sampling params
        # are ones it covers; the confidences, which need no sampling, are then computed for all
        # slots at once. Otherwise (every CPU call by default) the reference loop below runs.
        from dspark.kernels.markov import sample_block_fast

        fast = sample_block_fast(base_logits, anchors, self.markov, sampling)
        if fast is not None:
            tokens, logits = fast
            conf = None
            if self.confidence is not None:
                prev = torch.cat([anchors[:, None].to(tokens), tokens[:, :-1]], dim=1)  # [R, γ] x_{k−1}
                emb = self.markov.prev_embedding(prev) if self.markov is not None else None
                conf = torch.sigmoid(self.confidence(h, emb) / self.confidence_temperature)  # σ(z_k / T_k)
            return DraftBlock(tokens, logits, conf)
        prev = anchors.to(torch.int64)
        state = self.markov.init_state(h.shape[0], h) if self.markov is not None else None
        tokens, logits, conf = [], [], []
        for k in range(self.block_size):
            step = base_logits[:, k]
            emb = None
            if self.markov is not None:
                bias, state = self.markov.step(prev, h[:, k], state)
                step = step + bias.float()
                emb = self.markov.prev_embedding(prev)
            if self.confidence is not None:
                conf.append(self.calibrated_confidence(self.confidence(h[:, k], emb), k))
            prev = sample_step(step, sampling, k)
            tokens.append(prev)
            logits.append(step)
        confidences = torch.stack(conf, dim=1) if conf else None
        return DraftBlock(torch.stack(tokens, dim=1), torch.stack(logits, dim=1), confidences)

    # -- context cache --------------------------------------------------------------------------
    def allocate(self, max_slots: int, max_len: int) -> None:
        self.kv.allocate(max_slots, max_len, self.dtype, self.device)

    @torch.no_grad()
    def append_context(self, slots, tokens, features, last_hidden, lengths) -> None:
        """Project the new rows' features into every layer's K/V (the context is features only:
        ``tokens`` and ``last_hidden`` are not used by DSpark)."""
        self._check_features(features, self.fc.in_features)
        assert features.shape[:2] == tokens.shape, (features.shape, tokens.shape)
        n = tokens.shape[1]
        starts = self.kv.lengths_of(slots)  # [R]
        pos = (starts[:, None] + torch.arange(n)[None]).to(self.device)  # [R, n]
        k, v = self.project_context(features.to(self.device), pos)
        self.kv.append(slots, k, v, lengths)

    def context_length(self, slot: int) -> int:
        return self.kv.length(slot)

    def truncate(self, slot: int, length: int) -> None:
        self.kv.truncate(slot, length)

    def reset_slot(self, slot: int) -> None:
        self.kv.reset(slot)

    def move_slot(self, src: int, dst: int) -> None:
        self.kv.move(src, dst)

    # -- drafting -------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, slots, anchors, positions, sampling) -> DraftBlock:
        lens = self.kv.lengths_of(slots)  # [R] context lengths = anchor positions
        self._check_positions(positions, lens)
        ctx_k, ctx_v, _ = self.kv.gather(slots)  # [n_layers, R, kv_heads, P, hd]
        anchors = anchors.to(self.device)
        pos = positions.to(self.device, torch.int64)[:, None] + torch.arange(self.block_size, device=self.device)
        mask = block_attention_mask(lens[:, None].to(self.device), ctx_k.shape[3], self.block_size)
        h = self.backbone(self.embed(self.block_input_ids(anchors)), pos, ctx_k, ctx_v, mask)
        return self.sample_block(h, self.lm_head(h).float(), anchors, sampling)

    # -- training -------------------------------------------------------------------------------
    def train_forward(self, input_ids, features, last_hidden, anchors, keep, labels, *, detach_confidence=False):
        """All A blocks of a sequence in one attention call over [context (S rows) | blocks]: the
        context is every position's projected features, and :func:`block_attention_mask` lets a
        block see only rows before its anchor, itself, and no other block. The sequential head is
        teacher-forced: previous tokens [x_p, labels_1..labels_{γ−1}]. ``keep`` is not needed."""
        check_train_inputs(input_ids, features, last_hidden, anchors, keep, labels, self.block_size)
        self._check_features(features, self.fc.in_features)
        (b, s), a, g, dev = input_ids.shape, anchors.shape[1], self.block_size, self.device
        ids, anchors, labels = input_ids.to(dev), anchors.to(dev, torch.int64), labels.to(dev)
        ctx_k, ctx_v = self.project_context(features.to(dev), torch.arange(s, device=dev).expand(b, s))
        anchor_tok = ids.gather(1, anchors)  # [B, A] x_p
        block_ids = self.block_input_ids(anchor_tok.reshape(-1)).view(b, a * g)  # [B, A·γ]
        pos = (anchors[..., None] + torch.arange(g, device=dev)).view(b, a * g)  # [B, A·γ]
        mask = block_attention_mask(anchors, s, g)  # [B, 1, A·γ, S + A·γ]
        h = self.backbone(self.embed(block_ids), pos, ctx_k, ctx_v, mask).view(b, a, g, -1)  # [B, A, γ, d]
        logits = self.lm_head(h).float()  # [B, A, γ, V] U
        prev = torch.cat([anchor_tok[..., None], labels[..., :-1]], dim=-1)  # [B, A, γ] x_{k−1}
        emb = None
        if self.markov is not None:
            logits = logits + self.markov.block_bias(prev, h).float()
            emb = self.markov.prev_embedding(prev)  # [B, A, γ, r]
        conf = None
        if self.confidence is not None:
            if detach_confidence:
                h, emb = h.detach(), (emb.detach() if emb is not None else None)
            conf = self.confidence(h, emb)  # [B, A, γ]
        return TrainOutputs(logits, conf)
