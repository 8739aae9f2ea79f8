"""The specification of the Markov block-sampling op: DSpark's left-to-right loop as a pure function.

This is the loop of :meth:`dspark.drafter_service.providers.dspark.DSparkDrafter.sample_block`
for the ``vanilla`` head (or no head: DFlash), with the module calls spelled as the functions
they run (``nn.Embedding`` → ``F.embedding``, ``nn.Linear`` → ``F.linear``) and the per-step
Exp(1) noise passed in instead of drawn inside, so a test can feed both implementations the same
random stream. For slot k = 1..γ (x_0 = the anchor):

    z_k = U_k + (W2 · W1[x_{k−1}]).float()     (the bias in the weights' dtype, as the module gives it)
    x_k = argmax_v softmax(z_k / T)(v) / E_k(v)   (greedy rows, T = 0: argmax_v z_k(v))

Sampling goes through :func:`dspark.platform.sampling.logits_to_probs` and
:func:`~dspark.platform.sampling.sample_from_probs` with top-k / top-p off (the fast path falls
back to the model's loop when a request uses them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.platform.sampling import logits_to_probs, sample_from_probs

__all__ = ["markov_sample"]


def markov_sample(
    base_logits: torch.Tensor,  # [R, γ, V] float32 backbone logits U
    anchors: torch.Tensor,  # [R] int64 x_0
    w1: torch.Tensor | None,  # [V, r] W1 (Embedding weight); None = no Markov head
    w2: torch.Tensor | None,  # [V, r] W2 (Linear(r, V) weight)
    temperature: torch.Tensor,  # [R] float32; 0 = greedy
    exp_noise: torch.Tensor,  # [R, γ, V] Exp(1), slot k's noise in [:, k]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R, γ] int64, logits [R, γ, V] float32 (z, before T)
    """Sample a block of γ tokens left to right; see the module docstring.

    Example (greedy, V = 3, γ = 2, r = 1, W1 = [[0], [1], [0]], W2 = [[0], [0], [5]]): anchor 1 has
    bias [0, 0, 5], so with U = [[1, 2, 0], [1, 2, 0]] slot 1 gives z = [1, 2, 5] → token 2; token 2
    has bias 0, so slot 2 gives z = [1, 2, 0] → token 1. Tokens [[2, 1]].
    """
    assert base_logits.ndim == 3, f"base_logits must be [R, γ, V], got {list(base_logits.shape)}"
    r, gamma, v = base_logits.shape
    assert anchors.shape == (r,) and temperature.shape == (r,), (anchors.shape, temperature.shape)
    assert exp_noise.shape == (r, gamma, v), (exp_noise.shape, base_logits.shape)
    assert (w1 is None) == (w2 is None), "w1 and w2 come together"
    dev = base_logits.device
    top_k = torch.zeros(r, dtype=torch.int64)  # off
    top_p = torch.ones(r)  # off
    prev = anchors.to(dev, torch.int64)
    tokens, logits = [], []
    for k in range(gamma):
        step = base_logits[:, k]
        if w1 is not None:
            step = step + F.linear(F.embedding(prev, w1), w2).float()
        prev = sample_from_probs(logits_to_probs(step, temperature, top_k, top_p), exp_noise[:, k])
        tokens.append(prev)
        logits.append(step)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)
