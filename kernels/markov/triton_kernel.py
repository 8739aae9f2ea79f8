"""DSpark's Markov block sampling: all γ slots of a block in one Triton launch.

One program per request (grid ``[R]``) walks the γ slots in order, so the token sampled at slot k
feeds slot k+1's bias without leaving the program. Per slot:

* pass 1 over vocabulary tiles of ``BLOCK_V``: z = U + (W2_tile · W1[x_{k−1}]) (a ``[BLOCK_V, r]``
  tile of W2 times the rank-r embedding, rounded to the weights' dtype as ``nn.Linear`` returns
  it), stored to the logits output; a running argmax of z (the greedy token) and, for T > 0, the
  online-softmax max / Σexp of z / T;
* pass 2 (T > 0 only), re-reading the z just stored: the exponential race
  ``argmax(softmax(z/T) / E)`` with the slot's pre-drawn Exp(1) noise.

Traffic per slot and request is U, z (twice) and E (4 bytes each per token) plus the W2 tile
reads (r·2 bytes per token in bf16): W2 is re-read from L2 by every program at every slot, so the
kernel pays most where launch overhead dominates the reference (small R·V·r, or DFlash: no W2).

Divisions use ``div_rn`` (IEEE, as torch), not Triton's default approximate ``/``; ``exp`` is the
fast hardware one, so on GPU a sampled token can differ from the reference only when two
candidates' race scores tie within a few ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.kernels._triton_common import is_interpreted, tile_argmax

__all__ = ["INTERPRETED", "markov_sample"]

#: register budget of one W2 tile: BLOCK_V · BLOCK_R elements
_TILE_ELEMS = 16384


@triton.jit
def _markov_block_kernel(
    base_ptr, sb_r, sb_k, sb_v,  # [R, γ, V] U (any float dtype and strides)
    anchor_ptr,  # [R] int64 x_0
    w1_ptr, s_w1,  # [V, r] W1 rows (unit column stride)
    w2_ptr, s_w2,  # [V, r] W2 rows (unit column stride)
    temp_ptr,  # [R] float32 T; 0 = greedy
    noise_ptr, sn_r, sn_k, sn_v,  # [R, γ, V] Exp(1)
    tok_ptr,  # [R, γ] int64 out (contiguous)
    out_ptr, so_r, so_k,  # [R, γ, V] float32 out z (unit vocab stride)
    V,
    RANK,
    GAMMA,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    prev = tl.load(anchor_ptr + r).to(tl.int64)
    temp = tl.load(temp_ptr + r).to(tl.float32)
    sampled = temp != 0.0
    roffs = tl.arange(0, BLOCK_R)
    rlive = roffs < RANK
    for k in range(0, GAMMA):
        base_row = base_ptr + r * sb_r + k * sb_k
        out_row = out_ptr + r * so_r + k * so_k
        if HAS_BIAS:
            emb = tl.load(w1_ptr + prev * s_w1 + roffs, mask=rlive, other=0.0).to(tl.float32)  # W1[x_{k−1}]
        best_val = -float("inf")  # running argmax of z (first index on ties, like torch.argmax)
        best_idx = 0
        m = -float("inf")  # online softmax of z / T: running max and Σ exp(· − m)
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            live = offs < V
            z = tl.load(base_row + offs * sb_v, mask=live, other=0.0).to(tl.float32)
            if HAS_BIAS:
                w_ptrs = w2_ptr + offs.to(tl.int64)[:, None] * s_w2 + roffs[None, :]
                w = tl.load(w_ptrs, mask=live[:, None] & rlive[None, :], other=0.0).to(tl.float32)
                bias = tl.sum(w * emb[None, :], axis=1)
                # nn.Linear returns the bias in the weights' dtype; the reference then adds .float()
                z = z + bias.to(w2_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_row + offs, z, mask=live)
            best_val, best_idx = tile_argmax(tl.where(live, z, -float("inf")), offs, best_val, best_idx, V)
            if sampled:
                zt = tl.where(live, tl.math.div_rn(z, temp), -float("inf"))
                m_new = tl.maximum(m, tl.max(zt, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zt - m_new), axis=0)
                m = m_new
        tok = best_idx
        if sampled:
            # pass 2 reads back z stored above by other threads of this program
            tl.debug_barrier()
            noise_row = noise_ptr + r * sn_r + k * sn_k
            race_val = -float("inf")
            race_idx = 0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                live = offs < V
                z = tl.load(out_row + offs, mask=live, other=0.0)
                p = tl.math.div_rn(tl.exp(tl.math.div_rn(z, temp) - m), s)
                e = tl.load(noise_row + offs * sn_v, mask=live, other=1.0).to(tl.float32)
                score = tl.where(p > 0, tl.math.div_rn(p, e), -1.0)
                race_val, race_idx = tile_argmax(tl.where(live, score, -float("inf")), offs, race_val, race_idx, V)
            tok = race_idx
        tl.store(tok_ptr + r * GAMMA + k, tok.to(tl.int64))
        prev = tok.to(tl.int64)


INTERPRETED = is_interpreted(_markov_block_kernel)


def markov_sample(
    base_logits: torch.Tensor,  # [R, γ, V] float
    anchors: torch.Tensor,  # [R] int64, on the launch device
    w1: torch.Tensor | None,  # [V, r], unit column stride
    w2: torch.Tensor | None,  # [V, r], unit column stride
    temperature: torch.Tensor,  # [R] float32, on the launch device
    exp_noise: torch.Tensor,  # [R, γ, V] float
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R, γ] int64, logits [R, γ, V] float32
    r, gamma, v = base_logits.shape
    dev = base_logits.device
    tokens = torch.empty(r, gamma, dtype=torch.int64, device=dev)
    logits = torch.empty(r, gamma, v, dtype=torch.float32, device=dev)
    if r == 0 or gamma == 0:
        return tokens, logits
    has_bias = w1 is not None
    rank = int(w1.shape[1]) if has_bias else 0
    block_r = triton.next_power_of_2(max(rank, 1))
    if block_v is None:
        # the W2 tile ([BLOCK_V, BLOCK_R] fp32 products) bounds the vocabulary tile
        block_v = max(16, min(2048, _TILE_ELEMS // block_r, triton.next_power_of_2(v)))
    w1_arg = w1 if has_bias else base_logits  # never read without a head (HAS_BIAS is constexpr)
    w2_arg = w2 if has_bias else base_logits
    _markov_block_kernel[(r,)](
        base_logits, *base_logits.stride(), anchors,
        w1_arg, (w1.stride(0) if has_bias else 0), w2_arg, (w2.stride(0) if has_bias else 0),
        temperature, exp_noise, *exp_noise.stride(), tokens, logits, logits.stride(0), logits.stride(1),
        v, rank, gamma,
        HAS_BIAS=has_bias, BLOCK_V=block_v, BLOCK_R=block_r, num_warps=8,
    )
    return tokens, logits
