"""Test doubles for the drafter interface (``dspark.drafter_service.base.Drafter``).

``MockDrafter`` is a controlled stand-in used to test the *engine* independently of the real
drafter models: it proposes tokens from a fixed, deliberately different Markov chain
(``logits_table[prev]``), optionally mixed with the target's own greedy continuation
("oracle" mode, so that long prefixes get accepted), and it checks the engine's side of the
contract on every call: the context it is given must be exactly the committed text, and each
``propose`` must come with the anchor at position == context length.
"""

from __future__ import annotations

import torch

from dspark.drafter_service.base import DraftBlock
from dspark.platform.sampling import SamplingBatch, logits_to_probs, sample_from_probs


class MockDrafter(torch.nn.Module):
    def __init__(self, vocab_size: int, block_size: int, *, seed: int = 0, oracle=None, corrupt: float = 0.3,
                 confidences: bool = True, fail_after: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.logits_table = torch.randn(vocab_size, vocab_size, generator=g) * 2.0  # [V, V]
        self.oracle = oracle  # a FrozenTarget: draft its greedy continuation, corrupted at rate `corrupt`
        self.corrupt = corrupt
        self.with_conf = confidences
        self.fail_after = fail_after
        self.calls = 0
        self.contexts: dict[int, list[int]] = {}
        self.feature_rows: dict[int, int] = {}

    # -- context --------------------------------------------------------------------------
    def allocate(self, max_slots: int, max_len: int) -> None:
        self.contexts = {s: [] for s in range(max_slots)}
        self.feature_rows = {s: 0 for s in range(max_slots)}

    def append_context(self, slots, tokens, features, last_hidden, lengths) -> None:
        assert tokens.shape[:2] == features.shape[:2] == last_hidden.shape[:2], (tokens.shape, features.shape)
        for i, s in enumerate(slots.tolist()):
            n = int(lengths[i])
            self.contexts[s].extend(tokens[i, :n].tolist())
            self.feature_rows[s] += n

    def context_length(self, slot: int) -> int:
        return len(self.contexts[slot])

    def truncate(self, slot: int, length: int) -> None:
        del self.contexts[slot][length:]
        self.feature_rows[slot] = length

    def reset_slot(self, slot: int) -> None:
        self.contexts[slot] = []
        self.feature_rows[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        self.contexts[dst] = self.contexts[src]
        self.feature_rows[dst] = self.feature_rows[src]
        self.contexts[src] = []
        self.feature_rows[src] = 0

    # -- drafting ---------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, slots, anchors, positions, sampling: SamplingBatch) -> DraftBlock:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("mock drafter failure")
        R, G = len(slots), self.block_size
        for i, s in enumerate(slots.tolist()):
            assert len(self.contexts[s]) == int(positions[i]), (s, len(self.contexts[s]), int(positions[i]))
        tokens = torch.zeros(R, G, dtype=torch.long)
        logits = torch.zeros(R, G, self.vocab_size)
        oracle_next = self._oracle(slots, anchors) if self.oracle is not None else None
        prev = anchors.clone()
        for k in range(G):
            lk = self.logits_table[prev].clone()  # [R, V]
            if oracle_next is not None:
                # push mass onto the target's greedy token unless this (request, k) is corrupted
                keep = torch.rand(R, generator=torch.Generator().manual_seed(self.calls * 131 + k)) > self.corrupt
                lk[torch.arange(R)[keep], oracle_next[keep, k]] += 12.0
            probs = logits_to_probs(lk, sampling.temperature, sampling.top_k, sampling.top_p)
            x = sample_from_probs(probs, sampling.exponentials(self.vocab_size, step=k))  # the drafter contract's noise
            tokens[:, k], logits[:, k], prev = x, lk, x
        conf = torch.sigmoid(logits.max(-1).values - logits.logsumexp(-1) + 2.0) if self.with_conf else None
        return DraftBlock(tokens, logits, conf)

    def _oracle(self, slots, anchors) -> torch.Tensor:
        """[R, γ]: the target's greedy continuation after each slot's committed text + anchor."""
        out = torch.zeros(len(slots), self.block_size, dtype=torch.long)
        for i, s in enumerate(slots.tolist()):
            ids = torch.tensor([self.contexts[s] + [int(anchors[i])]])
            for k in range(self.block_size):
                nxt = self.oracle.model(input_ids=ids).logits[0, -1].argmax()
                out[i, k] = nxt
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        return out


class CyclePolicy:
    """Verify lengths cycling through a fixed pattern (exercises ragged batches, 0 included)."""

    def __init__(self, pattern=(0, 1, 3, 2, 4)):
        self.pattern = pattern
        self.t = 0

    def __call__(self, confidences, gamma, num_requests):
        self.t += 1
        return [min(gamma, self.pattern[(self.t + i) % len(self.pattern)]) for i in range(num_requests)]
