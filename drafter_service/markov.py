"""DSpark's sequential heads: the Markov transition bias and the confidence head.

Notation (DSpark paper Eq. 4–8). The parallel backbone gives each block slot k = 1..γ a hidden
state h_k ``[d]`` and base logits U_k = lm_head(h_k). The Markov head adds a bias that depends on
the previous token of the block, x_{k−1} (x_0 = the anchor), so the block distribution is

    p_k(v) = softmax(U_k(v) + B_k(x_{k−1}, v))

— an exact per-token softmax, which rejection sampling needs. Variants (``markov_head_type``):

* ``vanilla``: B = W2 · W1[x_{k−1}], W1 = Embedding(V, r), W2 = Linear(r, V, no bias). Ignores h_k.
* ``gated``:   B = W2 · (W1[x_{k−1}] ⊙ σ(G · [h_k ; W1[x_{k−1}]])), G = Linear(d + r → r).
* ``rnn``:     z = [s_{k−1} ; W1[x_{k−1}] ; h_k], (g, c, o) = split(J · z), J = Linear(2r + d → 3r);
               s_k = σ(g) ⊙ s_{k−1} + (1 − σ(g)) ⊙ tanh(c), B_k = W2 · tanh(o), s_0 = 0.

Rank r = 0 means no head at all (DFlash); :func:`build_markov_head` then returns None.

The confidence head predicts c_k = P(d_k accepted | d_<k accepted) = σ(Linear([h_k ; W1[x_{k−1}]]))
(or σ(Linear(h_k)) without the Markov embedding). At inference x_{k−1} is the sampled previous
draft; in training it is teacher-forced (the ground-truth previous token).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MarkovHead", "GatedMarkovHead", "RNNMarkovHead", "ConfidenceHead", "build_markov_head"]


class MarkovHead(nn.Module):
    """``vanilla``: the first-order transition bias W2ᵀ·W1[x_{k−1}] (stateless)."""

    kind = "vanilla"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        assert rank > 0, rank
        self.rank, self.hidden_size = rank, hidden_size
        self.w1 = nn.Embedding(vocab_size, rank)
        self.w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embedding(self, prev: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., r]
        return self.w1(prev)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """Recurrent state before slot 1 (None for stateless heads)."""
        return None

    def step(
        self,
        prev: torch.Tensor,  # [R] int64: x_{k−1}
        h: torch.Tensor,  # [R, d]: backbone hidden h_k
        state: torch.Tensor | None,  # [R, r] or None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block slot: (bias B_k [R, V], next state)."""
        return self.w2(self.w1(prev)), state

    def block_bias(
        self,
        prev: torch.Tensor,  # [..., γ] int64: x_0..x_{γ−1} (teacher-forced in training)
        h: torch.Tensor,  # [..., γ, d]
    ) -> torch.Tensor:  # [..., γ, V]
        """All γ biases of a block at once, for training with known previous tokens."""
        assert prev.shape == h.shape[:-1], (prev.shape, h.shape)
        flat_p, flat_h = prev.reshape(-1, prev.shape[-1]), h.reshape(-1, *h.shape[-2:])
        state = self.init_state(flat_p.shape[0], flat_h)
        out = []
        for k in range(prev.shape[-1]):
            b, state = self.step(flat_p[:, k], flat_h[:, k], state)
            out.append(b)
        return torch.stack(out, dim=1).reshape(*prev.shape, -1)


class GatedMarkovHead(MarkovHead):
    """``gated``: the W1 embedding scaled by σ(G·[h_k ; W1[x_{k−1}]]) before W2."""

    kind = "gated"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size, rank, hidden_size)
        self.gate = nn.Linear(hidden_size + rank, rank)

    def step(self, prev, h, state):
        e = self.w1(prev)  # [R, r]
        g = torch.sigmoid(self.gate(torch.cat([h.to(e.dtype), e], dim=-1)))
        return self.w2(e * g), state


class RNNMarkovHead(MarkovHead):
    """``rnn``: a GRU-like state s_k carried across the block's slots (s_0 = 0)."""

    kind = "rnn"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size, rank, hidden_size)
        self.joint = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, self.rank, dtype=self.w1.weight.dtype, device=like.device)

    def step(self, prev, h, state):
        e = self.w1(prev)  # [R, r]
        g, c, o = self.joint(torch.cat([state, e, h.to(e.dtype)], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        state = g * state + (1.0 - g) * torch.tanh(c)
        return self.w2(torch.tanh(o)), state


_HEADS = {c.kind: c for c in (MarkovHead, GatedMarkovHead, RNNMarkovHead)}


def build_markov_head(kind: str, vocab_size: int, rank: int, hidden_size: int) -> MarkovHead | None:
    """The head named by ``kind`` (vanilla / gated / rnn), or None when ``rank`` is 0."""
    if rank == 0:
        return None
    if kind not in _HEADS:
        raise ValueError(f"unknown markov_head_type {kind!r}; choose one of {sorted(_HEADS)}")
    return _HEADS[kind](vocab_size, rank, hidden_size)


class ConfidenceHead(nn.Module):
    """c_k logit = Linear([h_k ; W1[x_{k−1}]] → 1) (``markov_rank`` > 0 and with_markov), else
    Linear(h_k → 1). Returns the logit; the caller applies the sigmoid (the training loss wants
    logits, ``binary_cross_entropy_with_logits``)."""

    def __init__(self, hidden_size: int, markov_rank: int = 0):
        super().__init__()
        self.markov_rank = markov_rank
        self.proj = nn.Linear(hidden_size + markov_rank, 1)

    def forward(
        self,
        h: torch.Tensor,  # [..., d]
        prev_emb: torch.Tensor | None = None,  # [..., r]: W1[x_{k−1}] (shared with the Markov head)
    ) -> torch.Tensor:  # [...] float32 logits
        if self.markov_rank:
            assert prev_emb is not None and prev_emb.shape[-1] == self.markov_rank, "needs W1[x_{k-1}]"
            h = torch.cat([h, prev_emb.to(h.dtype)], dim=-1)
        return self.proj(h).squeeze(-1).float()
