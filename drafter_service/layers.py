"""Qwen3-style building blocks for every drafter, plus RoPE and the context K/V store.

All drafters (DSpark, DFlash, EAGLE-3-style, MTP-1) are built from the same plain-torch pieces,
sized from the target's Hugging Face config (:class:`LayerSpec`), one device, no HF modules:

* :class:`RMSNorm`, :func:`rope_cos_sin` / :func:`apply_rope` (HF "rotate half" convention);
* :class:`Attention`: q/k/v/o projections, per-head q/k RMSNorm, RoPE, GQA, and
  ``F.scaled_dot_product_attention`` over ``[explicit key/value prefix ; own tokens]`` with an
  explicit boolean mask (True = attend). :meth:`Attention.project_kv` is the one place keys and
  values are made, so cached context K/V and freshly computed ones are bit-identical;
* :class:`DecoderLayer`: pre-norm attention + SwiGLU MLP, residuals around both;
* :class:`ContextKV`: per-slot preallocated K/V of committed context tokens,
  ``[n_layers, max_slots, kv_heads, max_len, head_dim]`` plus per-slot lengths kept on the CPU,
  so rollback is "set the length" and a batched gather pads to the batch's longest slot.

Frozen copies. Every provider holds the target's input embedding as ``embed`` and its LM head as
``lm_head`` (:func:`frozen_embed_and_head`); these two modules are never trained and never saved
(:data:`FROZEN_MODULES`): a checkpoint re-copies them from the target at load time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FROZEN_MODULES",
    "LayerSpec",
    "RMSNorm",
    "rope_cos_sin",
    "apply_rope",
    "Attention",
    "MLP",
    "DecoderLayer",
    "ContextKV",
    "frozen_embed_and_head",
    "target_identity",
    "init_linear",
]

#: top-level module names every provider uses for its frozen target copies (never saved)
FROZEN_MODULES = ("embed", "lm_head")


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one draft decoder layer, read from the target's HF config.

    ``head_dim`` is the config's ``head_dim`` when it has one (Qwen3, Llama), else
    ``hidden_size // num_attention_heads``. Multi-head-latent-attention configs (DeepSeek-V2/V3,
    recognised by ``kv_lora_rank``) carry a ``head_dim`` that means the RoPE part of a head only,
    so for them the plain ``hidden_size // heads`` is used. RoPE is the plain rotary embedding with
    ``rope_theta`` (rope scaling variants are not reproduced: the drafter is trained with its own
    positions and never shares cached keys with the target).
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "LayerSpec":
        d = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None)
        if head_dim is None or getattr(cfg, "kv_lora_rank", None) is not None:
            head_dim = d // heads
        theta = None
        rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
        if isinstance(rp, dict):
            theta = rp.get("rope_theta")
        theta = theta or getattr(cfg, "rope_theta", None) or 10000.0
        return cls(
            hidden_size=d, num_heads=heads, num_kv_heads=int(kv), head_dim=int(head_dim),
            intermediate_size=int(cfg.intermediate_size), rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta), init_std=float(getattr(cfg, "initializer_range", 0.02)),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


def init_linear(module: nn.Module, std: float) -> None:
    """HF-style init for every Linear/Embedding below ``module`` (normal(0, std), zero bias)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(
    positions: torch.Tensor,  # [..., s] int64 (negative positions are allowed: only differences matter)
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[..., s, head_dim]`` in the HF layout (the two halves repeat the frequencies)."""
    assert head_dim % 2 == 0, head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., s, hd/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    x: torch.Tensor,  # [b, heads, s, hd]
    cos: torch.Tensor,  # [b, s, hd]
    sin: torch.Tensor,  # [b, s, hd]
) -> torch.Tensor:
    assert x.ndim == 4 and cos.shape == sin.shape and cos.shape[-2:] == x.shape[-2:], (x.shape, cos.shape)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Qwen3 attention whose keys/values are ``[prefix ; own tokens]``.

    The prefix (already projected K/V, e.g. a slot's cached context) is given explicitly, as is the
    mask, so the same module serves DSpark blocks (bidirectional inside the block, context before
    the anchor), training over many blocks (any boolean mask) and autoregressive layers (causal).
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
        self.k_norm = RMSNorm(hd, spec.rms_norm_eps)

    def project_kv(
        self,
        x: torch.Tensor,  # [b, s, d] (already normed by the caller when it should be)
        cos: torch.Tensor,  # [b, s, hd]
        sin: torch.Tensor,  # [b, s, hd]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (k_norm, then RoPE at each row's position) and values, ``[b, kv_heads, s, hd]``."""
        b, s, _ = x.shape
        kv, hd = self.spec.num_kv_heads, self.spec.head_dim
        k = self.k_norm(self.k_proj(x).view(b, s, kv, hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, kv, hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # [b, q, d] normed query tokens
        cos: torch.Tensor,  # [b, q, hd] at the query tokens' positions
        sin: torch.Tensor,  # [b, q, hd]
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,  # K, V [b, kv_heads, P, hd]
        mask: torch.Tensor | None = None,  # [b, 1 | heads, q, P + q] bool, True = attend
    ) -> torch.Tensor:  # [b, q, d]
        b, q_len, _ = x.shape
        h, hd = self.spec.num_heads, self.spec.head_dim
        q = self.q_norm(self.q_proj(x).view(b, q_len, h, hd)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        if prefix is not None:
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)
        if mask is not None:
            assert mask.dtype == torch.bool and mask.shape[-1] == k.shape[2], (mask.shape, k.shape)
        groups = h // self.spec.num_kv_heads
        if groups > 1:  # GQA: each kv head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, h * hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Qwen3 decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self,
        x: torch.Tensor,  # [b, q, d]
        cos: torch.Tensor,  # [b, q, hd]
        sin: torch.Tensor,  # [b, q, hd]
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,  # K, V [b, kv_heads, P, hd]
        mask: torch.Tensor | None = None,  # [b, 1, q, P + q] bool
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, prefix, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# Context K/V store
# ---------------------------------------------------------------------------------------------


class ContextKV:
    """Per-slot K/V rows of committed context, preallocated.

    ``k``/``v``: ``[n_layers, max_slots, kv_heads, max_len, head_dim]``; ``lengths``: ``[max_slots]``
    int64 on the CPU (the engine's slot bookkeeping is CPU-side anyway; reading a length never
    synchronises the device). Rows at or past a slot's length are garbage and never read unmasked.
    """

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n_layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.k = self.v = None
        self.lengths = torch.zeros(0, dtype=torch.int64)
        self.max_len = 0

    def allocate(self, max_slots: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Fresh zeroed storage (all slots empty), optionally on a new dtype / device."""
        self.dtype, self.device = dtype or self.dtype, device or self.device
        n, kv, hd = self.shape
        self.k = torch.zeros(n, max_slots, kv, max_len, hd, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(max_slots, dtype=torch.int64)
        self.max_len = max_len

    def _check(self) -> None:
        if self.k is None:
            raise RuntimeError("context cache not allocated: call allocate(max_slots, max_len) first")

    def append(
        self,
        slots: torch.Tensor,  # [R] int64
        k: torch.Tensor,  # [n_layers, R, kv_heads, n, hd]
        v: torch.Tensor,  # [n_layers, R, kv_heads, n, hd]
        counts: torch.Tensor,  # [R] int64, rows of each request to store (0 allowed)
    ) -> None:
        """Write row j < counts[r] of request r at position lengths[slot_r] + j; advance lengths."""
        self._check()
        assert k.ndim == 5 and k.shape == v.shape and k.shape[1] == slots.shape[0] == counts.shape[0], (k.shape, slots.shape)
        slots_c, counts_c = slots.cpu(), counts.cpu()
        starts = self.lengths[slots_c]
        if len(set(slots_c.tolist())) != len(slots_c):
            raise ValueError(f"slots must be distinct, got {slots_c.tolist()}")
        if bool((counts_c < 0).any() | (counts_c > k.shape[3]).any()):
            raise ValueError(f"lengths {counts_c.tolist()} must lie in 0..{k.shape[3]} (the padded width)")
        over = starts + counts_c > self.max_len
        if over.any():
            s = int(slots_c[over][0])
            raise ValueError(f"slot {s} would exceed the context cache's max_len {self.max_len}")
        valid = torch.arange(k.shape[3])[None] < counts_c[:, None]  # [R, n]
        r_idx, j_idx = valid.nonzero(as_tuple=True)
        if r_idx.numel():
            dst_s = slots_c[r_idx].to(self.device)
            dst_p = (starts[r_idx] + j_idx).to(self.device)
            r_d, j_d = r_idx.to(k.device), j_idx.to(k.device)
            # advanced indices on dims 1 and 3: both sides are [N, n_layers, kv_heads, hd]
            self.k[:, dst_s, :, dst_p] = k[:, r_d, :, j_d].to(self.dtype)
            self.v[:, dst_s, :, dst_p] = v[:, r_d, :, j_d].to(self.dtype)
        self.lengths[slots_c] = starts + counts_c

    def gather(
        self, slots: torch.Tensor  # [R] int64
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``[n_layers, R, kv_heads, P, hd]`` padded to P = the longest of these slots, and
        ``valid`` ``[R, P]`` bool (True = a real context row)."""
        lens = self.lengths_of(slots)
        p = int(lens.max()) if lens.numel() else 0
        idx = slots.to(self.device)
        valid = torch.arange(p)[None] < lens[:, None]
        return self.k[:, idx, :, :p], self.v[:, idx, :, :p], valid.to(self.device)

    def lengths_of(self, slots: torch.Tensor) -> torch.Tensor:  # [R] -> [R] int64 (CPU)
        self._check()
        return self.lengths[slots.cpu()]

    def length(self, slot: int) -> int:
        return int(self.lengths[slot]) if self.k is not None else 0

    def truncate(self, slot: int, length: int) -> None:
        self._check()
        if not 0 <= length <= int(self.lengths[slot]):
            raise ValueError(f"cannot truncate slot {slot} of length {int(self.lengths[slot])} to {length}")
        self.lengths[slot] = length

    def reset(self, slot: int) -> None:
        self._check()
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self._check()
        if src == dst:
            return
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0


# ---------------------------------------------------------------------------------------------
# Target-bound helpers shared by every provider
# ---------------------------------------------------------------------------------------------


def frozen_embed_and_head(target: Any) -> tuple[nn.Embedding, nn.Linear]:
    """Copies of the target's input embedding and LM head, with ``requires_grad`` off."""
    w_emb = target.embed_tokens.weight.detach()
    w_head = target.lm_head.weight.detach()
    embed = nn.Embedding(w_emb.shape[0], w_emb.shape[1], device=w_emb.device, dtype=w_emb.dtype)
    head = nn.Linear(w_head.shape[1], w_head.shape[0], bias=False, device=w_head.device, dtype=w_head.dtype)
    with torch.no_grad():
        embed.weight.copy_(w_emb)
        head.weight.copy_(w_head)
    embed.requires_grad_(False)
    head.requires_grad_(False)
    return embed, head


def target_identity(target: Any) -> dict:
    """What a drafter checkpoint records about the target it was built for."""
    return {
        "model_type": str(getattr(target.config, "model_type", "unknown")),
        "vocab_size": int(target.vocab_size),
        "hidden_size": int(target.hidden_size),
        "num_hidden_layers": int(target.num_layers),
        "layer_ids": [int(i) for i in target.layer_ids],
    }
