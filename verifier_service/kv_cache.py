"""Slot-based KV cache the verifier engine owns, plugged into Hugging Face models.

Layout. Every decoder layer gets two preallocated tensors ``[max_slots, heads, capacity, dim]``
(K and V; their shapes are taken from the first write, so multi-latent attention, whose "keys"
and "values" are compressed latents of different widths, works unchanged). A running request
owns one *slot*; ``lengths[slot]`` is how many of its positions hold committed tokens.

One forward. The engine calls :meth:`begin` with a contiguous range of slots (verification:
``0..R-1``, as the engine keeps running requests compacted; prefill: the one new slot), so K/V
are returned as views, never gathered copies, and the number of new tokens per row, then runs the model with
``past_key_values=self`` and the 4-D mask from :meth:`attention_mask`. Each layer's ``update``
writes the ``q`` new positions of row r at ``lengths[r] .. lengths[r] + q - 1`` (padding rows
write garbage past their valid tokens, which the mask hides and later writes overwrite) and
returns K/V views ``[R, heads, max_len_in_batch, dim]``. :meth:`commit` then sets each slot's
length to what was accepted: **rollback of rejected drafts is only a length change**; nothing is
copied. Buffers start zeroed so masked positions never hold NaN (0 · NaN would leak through
attention).
"""

from __future__ import annotations

import torch

__all__ = ["SlotKVCache"]


class SlotKVCache:
    def __init__(self, num_layers: int, max_slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [slots, H, cap, Dk]
        self.values: list[torch.Tensor | None] = [None] * num_layers  # [slots, H, cap, Dv]
        self.lengths = torch.zeros(max_slots, dtype=torch.long)  # committed positions per slot (CPU)
        self._start = 0
        self._rows = 0
        self._q = 0
        self._write_pos: torch.Tensor | None = None  # [R, q] positions written by the current forward
        self._kv_len = 0

    # -- transformers Cache protocol (the parts the decoders call) ----------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states [R, H, q, Dk], value_states [R, H, q, Dv]
        R, q = self._rows, self._q
        if key_states.shape[0] != R or key_states.shape[2] != q:
            raise RuntimeError(f"cache expected [{R}, H, {q}, D] for this forward, got {tuple(key_states.shape)}")
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = torch.zeros(
                (self.max_slots, key_states.shape[1], self.capacity, key_states.shape[3]), device=self.device, dtype=self.dtype
            )
            self.values[layer_idx] = torch.zeros(
                (self.max_slots, value_states.shape[1], self.capacity, value_states.shape[3]), device=self.device, dtype=self.dtype
            )
        K, V = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(self._start, self._start + R, device=self.device)[:, None]  # [R, 1]
        # advanced indices on dims 0 and 2 -> the indexed view is [R, q, H, D]
        K[rows, :, self._write_pos] = key_states.transpose(1, 2).to(self.dtype)
        V[rows, :, self._write_pos] = value_states.transpose(1, 2).to(self.dtype)
        sl = slice(self._start, self._start + R)
        return K[sl, :, : self._kv_len], V[sl, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths[self._start : self._start + max(self._rows, 1)].max())

    @property
    def is_compileable(self) -> bool:
        return False

    # -- engine side -----------------------------------------------------------------------------
    def begin(self, start: int, num_rows: int, q_len: int) -> None:
        """Prepare a forward of ``q_len`` new tokens for slots ``start..start+num_rows-1``."""
        if start < 0 or start + num_rows > self.max_slots:
            raise ValueError(f"slots {start}..{start + num_rows - 1} outside 0..{self.max_slots - 1}")
        base = self.lengths[start : start + num_rows]
        if int(base.max()) + q_len > self.capacity:
            raise RuntimeError(f"KV capacity {self.capacity} exceeded (length {int(base.max())} + {q_len})")
        self._start, self._rows, self._q = start, num_rows, q_len
        self._write_pos = (base[:, None] + torch.arange(q_len)[None, :]).to(self.device)  # [R, q]
        self._kv_len = int(base.max()) + q_len

    def positions(self) -> torch.Tensor:
        """[R, q] absolute positions of the tokens of the current forward (the position_ids)."""
        return self._write_pos

    def attention_mask(self, as_float: bool = False) -> torch.Tensor:
        """[R, 1, q, kv_len]: token i of row r (at position lengths[r] + i) attends to positions
        <= its own (the committed prefix plus the new tokens before it). bool (True = attend)
        for SDPA, or additive float for eager attention."""
        key_pos = torch.arange(self._kv_len, device=self.device)  # [kv]
        mask = key_pos[None, None, :] <= self._write_pos[:, :, None]  # [R, q, kv]
        mask = mask[:, None]  # [R, 1, q, kv]
        if as_float:
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        return mask

    def end(self) -> None:
        self._start = self._rows = self._q = self._kv_len = 0
        self._write_pos = None

    def set_length(self, slot: int, length: int) -> None:
        """Commit/rollback: slot keeps its first ``length`` positions."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside [0, {self.capacity}]")
        self.lengths[slot] = length

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into ``dst`` (used to keep running requests compacted)."""
        n = int(self.lengths[src])
        for K, V in zip(self.keys, self.values):
            if K is not None:
                K[dst, :, :n] = K[src, :, :n]
                V[dst, :, :n] = V[src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def layer_kv(self, layer_idx: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed K/V of one slot: ([H, n, Dk], [H, n, Dv]) (for tests and debugging)."""
        n = int(self.lengths[slot])
        return self.keys[layer_idx][slot, :, :n], self.values[layer_idx][slot, :, :n]
