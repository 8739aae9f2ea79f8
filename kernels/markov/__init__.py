"""DSpark Markov block sampling: the γ-slot left-to-right loop in one launch.

* :func:`markov_sample` — the op (dispatching): base logits U ``[R, γ, V]``, anchors, the vanilla
  head's W1 / W2 (or none: DFlash), per-request temperatures and pre-drawn Exp(1) noise
  ``[R, γ, V]`` → tokens ``[R, γ]`` and corrected logits ``[R, γ, V]``. Reference:
  :func:`.reference.markov_sample`.
* :func:`sample_block_fast` — what ``DSparkDrafter.sample_block`` asks first: the op's tokens and
  logits for a drafter's head and a :class:`~dspark.platform.sampling.SamplingBatch`, drawing the
  noise from the requests' generators exactly as the model's loop does (slot by slot, request by
  request), or None when the fast path does not apply — the dispatcher says reference (every CPU
  call by default), the head is not ``vanilla`` (``gated`` / ``rnn`` read h_k and carry state:
  the model's loop handles them), or a request uses top-k / top-p (a sort per slot; the loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dspark.kernels import dispatch
from dspark.kernels.markov import reference

if TYPE_CHECKING:
    from dspark.platform.sampling import SamplingBatch

__all__ = ["SUPPORTED_HEADS", "draw_block_noise", "markov_sample", "markov_sample_triton", "sample_block_fast"]

#: Markov head kinds the kernel implements (None = no head, i.e. DFlash)
SUPPORTED_HEADS = ("vanilla",)


def _check_args(base_logits, anchors, w1, w2, temperature, exp_noise) -> None:
    if base_logits.ndim != 3:
        raise ValueError(f"base_logits must be [R, γ, V], got {list(base_logits.shape)}")
    r, gamma, v = base_logits.shape
    if anchors.shape != (r,) or temperature.shape != (r,):
        raise ValueError(f"anchors and temperature must be [R={r}], got {list(anchors.shape)}, {list(temperature.shape)}")
    if exp_noise.shape != (r, gamma, v):
        raise ValueError(f"exp_noise must be [R, γ, V]={[r, gamma, v]}, got {list(exp_noise.shape)}")
    if (w1 is None) != (w2 is None):
        raise ValueError("w1 and w2 come together (both None: no Markov head)")
    if w1 is not None and (w1.ndim != 2 or w2.ndim != 2 or w2.shape[0] != v or w1.shape[1] != w2.shape[1]):
        raise ValueError(f"w1 must be [V', r] and w2 [V={v}, r], got {list(w1.shape)}, {list(w2.shape)}")


def markov_sample_triton(
    base_logits: torch.Tensor,  # [R, γ, V] float
    anchors: torch.Tensor,  # [R] int64
    w1: torch.Tensor | None,  # [V', r]
    w2: torch.Tensor | None,  # [V, r]
    temperature: torch.Tensor,  # [R] float; 0 = greedy
    exp_noise: torch.Tensor,  # [R, γ, V] Exp(1)
    *,
    block_v: int | None = None,  # vocabulary tile (tests use small ones to hit tile edges)
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R, γ] int64, logits [R, γ, V] float32
    """The Triton implementation (one program per request)."""
    _check_args(base_logits, anchors, w1, w2, temperature, exp_noise)
    kern = dispatch.load("markov", base_logits)
    dev = base_logits.device
    # the kernel indexes weight rows with a unit column stride; nn.Embedding / nn.Linear weights have it
    w1 = w1 if w1 is None or w1.stride(1) == 1 else w1.contiguous()
    w2 = w2 if w2 is None or w2.stride(1) == 1 else w2.contiguous()
    return kern.markov_sample(base_logits, anchors.to(dev, torch.int64).contiguous(), w1, w2,
                              temperature.to(dev, torch.float32).contiguous(), exp_noise.to(dev), block_v=block_v)


def markov_sample(
    base_logits: torch.Tensor,  # [R, γ, V] float
    anchors: torch.Tensor,  # [R] int64
    w1: torch.Tensor | None,  # [V', r]
    w2: torch.Tensor | None,  # [V, r]
    temperature: torch.Tensor,  # [R] float; 0 = greedy
    exp_noise: torch.Tensor,  # [R, γ, V] Exp(1)
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R, γ] int64, logits [R, γ, V] float32
    """Dispatching entry point (Triton on CUDA, the reference elsewhere)."""
    if dispatch.use_triton(base_logits):
        return markov_sample_triton(base_logits, anchors, w1, w2, temperature, exp_noise)
    return reference.markov_sample(base_logits, anchors, w1, w2, temperature, exp_noise)


def _filters_active(sampling: "SamplingBatch", vocab: int) -> bool:
    """Some request uses top-k or top-p (host check when the params live on the host, as usual)."""
    k, p = sampling.top_k, sampling.top_p
    return bool((((k > 0) & (k < vocab)).any() | (p < 1).any()).item())


def draw_block_noise(sampling: "SamplingBatch", gamma: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[R, γ, V] Exp(1): slot k's rows exactly as the model's loop gets them at slot k
    (``SamplingBatch.exponentials`` with step k: E(key, offset + k) for keyed rows, request r's own
    generator otherwise), so every generator advances exactly as in the loop."""
    return torch.stack([sampling.exponentials(vocab, device, step=k) for k in range(gamma)], dim=1)


def sample_block_fast(
    base_logits: torch.Tensor,  # [R, γ, V] float32 U
    anchors: torch.Tensor,  # [R] int64
    markov: Any,  # the drafter's Markov head module (``kind``, ``w1``, ``w2``) or None
    sampling: "SamplingBatch",
) -> tuple[torch.Tensor, torch.Tensor] | None:  # tokens [R, γ], logits [R, γ, V]; None = use the loop
    """The drafter's block through the kernel, or None (see the module docstring for when)."""
    if not dispatch.use_triton(base_logits):
        return None
    if markov is not None and getattr(markov, "kind", None) not in SUPPORTED_HEADS:
        return None
    r, gamma, v = base_logits.shape
    if r == 0 or len(sampling) != r or _filters_active(sampling, v):
        return None
    noise = draw_block_noise(sampling, gamma, v, base_logits.device)
    w1 = markov.w1.weight if markov is not None else None
    w2 = markov.w2.weight if markov is not None else None
    return markov_sample_triton(base_logits, anchors, w1, w2, sampling.temperature, noise)
