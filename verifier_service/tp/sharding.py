"""Megatron-style tensor parallelism for a frozen Hugging Face target, in place, pure torch.

Contract. ``shard_target(target, rank, world_size, group)`` rewrites the decoder layers of
``target.model`` so that rank ``r`` of ``W`` keeps ``1/W`` of every attention and MLP block and the
ranks together compute the same function as the unsharded model. Every rank must call it with the
same checkpoint and its own rank, and afterwards every rank must run every forward with identical
inputs (lockstep): each split block ends in one ``torch.distributed.all_reduce`` over ``group``,
after which all ranks hold the same, complete hidden state. So ``forward`` keeps its contract
(``features``, ``last_hidden`` and ``logits`` are full-width and identical on every rank) and the
verifier engine, the slot KV cache (its buffers take their head count from the first write) and a
drafter reading the target's features run unchanged on each rank. The checks run before anything
is modified, so a refused model is left as it was.

Notation. ``W`` ranks, rank ``r``; ``D`` model width; ``H`` query heads and ``Hkv`` key/value heads of
width ``d`` (``dv`` for values); ``I`` MLP width; ``E`` experts. ``X[a:b]`` of a ``[out, in]`` weight
keeps output rows, ``X[:, a:b]`` input columns. Rank ``r`` owns query heads
``[r·H/W, (r+1)·H/W)`` and kv heads ``[r·Hkv/W, (r+1)·Hkv/W)``: contiguous blocks, so each local
query head still reads its own kv head (query head ``h`` uses kv head ``h // (H/Hkv)``) and the
modules' ``num_key_value_groups = H/Hkv`` is unchanged.

What is split, per decoder layer:

* attention (Llama / Qwen / Qwen3 layout): ``q_proj``, ``k_proj``, ``v_proj`` column-parallel by
  whole heads (rows and bias); ``o_proj`` row-parallel (input columns of the local heads) followed
  by the all-reduce, its bias added once after it. Qwen3's ``q_norm``/``k_norm`` act on one head's
  ``d`` features and stay replicated. ``H`` and ``Hkv`` must both divide by ``W``.
* attention (DeepSeek-V3 multi-latent): the latent projections (``q_a_proj``, ``kv_a_proj_with_mqa``
  and their norms) are replicated, so the cached latents are full on every rank; the per-head
  up-projections ``q_b_proj`` (or ``q_proj``) and ``kv_b_proj`` are column-parallel by heads,
  ``o_proj`` row-parallel + all-reduce. ``H`` must divide by ``W``.
* dense MLP (``gate_proj``/``up_proj``/``down_proj``): gate and up column-parallel, down row-parallel
  + all-reduce (bias after it).
* MoE block (Qwen3-MoE, DeepSeek-V3): the router stays replicated (every rank picks the same experts
  for every token); **each expert's MLP is split** like the dense one (fused ``gate_up_proj``
  ``[E, 2I, D]`` keeps the local gate rows and the local up rows, ``down_proj`` ``[E, D, I]`` the
  local columns), as is a shared expert. Each rank's block output is then a partial sum (routing
  weights and a shared-expert gate scale the partials linearly) and one all-reduce of the block
  output completes it (a forward hook on the block).
* replicated: embeddings, every norm, the LM head, routers.

Head-count attributes. The modules of recent transformers reshape with ``-1`` heads (Qwen3:
``view(*input_shape, -1, head_dim)``, ``reshape(*input_shape, -1)``), so the sliced projections are
enough; ints stored on an attention module as ``num_heads`` / ``num_attention_heads`` /
``num_key_value_heads`` / ``num_kv_heads`` (older releases, DeepSeek's MLA) are divided by ``W`` as
well. The shared ``model.config`` is never changed: it keeps describing the full model, which is
what a drafter built from it must see.

Why the results equal TP=1 up to float reassociation. A column-parallel layer computes a subset of
the output features, each with the same dot product as unsharded; attention is independent per
head; elementwise activations commute with the split. The only change is in the row-parallel
layers: ``y = x·Wᵀ`` becomes ``Σ_r x_r·W_rᵀ``, the same sum grouped into ``W`` partial sums, and
the bias is added once after the reduce. Every rank receives the same reduced tensor, so the ranks
agree with each other bit for bit (given a deterministic all-reduce), and with TP=1 to within
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from dspark.platform.target.loading import FrozenTarget

__all__ = ["RowParallelLinear", "shard_target", "tp_info"]

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")
_MARK = "_dspark_tp"  # (rank, world_size) set on the model once sharded


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r · W_rᵀ) + b``: the local input columns of a linear layer, the partial
    sums added across ranks, the (replicated) bias added once after the reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Any = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in/W]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # [out]
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [..., out], this rank's partial sum
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, bias={self.bias is not None}"


def tp_info(target: FrozenTarget) -> tuple[int, int] | None:
    """``(rank, world_size)`` if ``target`` was sharded by :func:`shard_target`, else None."""
    return getattr(target.model, _MARK, None)


# ------------------------------------------------------------------ plans (checks, no changes)
@dataclass
class _AttnPlan:
    kind: str  # "mha" (q/k/v/o) or "mla" (DeepSeek latent attention)
    module: nn.Module
    heads: int  # H
    kv_heads: int  # Hkv (= H for MLA: the per-head up-projection is the split)
    q_width: int  # features per query head in the query projection
    kv_width: int  # features per kv head in k_proj (MHA) or kv_b_proj (MLA)
    v_width: int  # features per head entering o_proj


@dataclass
class _MlpPlan:
    kind: str  # "dense" or "moe"
    module: nn.Module
    dense: list[nn.Module]  # gated MLPs to split (the dense MLP, shared experts, per-expert MLPs)
    fused_experts: nn.Module | None  # experts stored as [E, 2I, D] / [E, D, I] parameters


def _linear(m: nn.Module, name: str, where: str) -> nn.Linear:
    lin = getattr(m, name, None)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"{where}: expected an nn.Linear `{name}`, found {type(lin).__name__}; this layout is not supported for tensor parallelism")
    return lin


def _per_head(total: int, heads: int, what: str, where: str) -> int:
    if heads <= 0 or total % heads:
        raise ValueError(f"{where}: {what} has {total} features, not a multiple of {heads}")
    return total // heads


def _plan_attention(attn: nn.Module, config: Any, world: int, where: str) -> _AttnPlan:
    if hasattr(attn, "sinks"):
        raise ValueError(f"{where}: attention sinks are not supported for tensor parallelism")
    H = int(getattr(attn, "num_heads", 0) or config.num_attention_heads)
    if hasattr(attn, "kv_b_proj"):  # DeepSeek multi-latent attention
        q = _linear(attn, "q_b_proj", where) if getattr(attn, "q_b_proj", None) is not None else _linear(attn, "q_proj", where)
        kvb, o = _linear(attn, "kv_b_proj", where), _linear(attn, "o_proj", where)
        if H % world:
            raise ValueError(f"{where}: {H} attention heads do not divide by tensor-parallel size {world}")
        return _AttnPlan("mla", attn, H, H, _per_head(q.out_features, H, "q_b_proj", where),
                         _per_head(kvb.out_features, H, "kv_b_proj", where), _per_head(o.in_features, H, "o_proj's input", where))
    q, k, v, o = (_linear(attn, n, where) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    d = int(getattr(attn, "head_dim", 0) or getattr(config, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
    H = _per_head(q.out_features, d, f"q_proj (head_dim {d})", where)
    Hkv = _per_head(k.out_features, d, f"k_proj (head_dim {d})", where)
    if H % world or Hkv % world:
        raise ValueError(
            f"{where}: tensor-parallel size {world} must divide both the query heads ({H}) and the "
            f"key/value heads ({Hkv}); {world} does not divide {H if H % world else Hkv}"
        )
    for norm_name in ("q_norm", "k_norm"):
        norm = getattr(attn, norm_name, None)
        w = getattr(norm, "weight", None)
        if w is not None and w.numel() != d:
            raise ValueError(f"{where}: {norm_name} spans {w.numel()} features, not one head ({d}); "
                             "a norm across heads cannot be split")
    return _AttnPlan("mha", attn, H, Hkv, d, d, _per_head(v.out_features, Hkv, "v_proj", where))


def _check_dense(mlp: nn.Module, world: int, where: str) -> None:
    g, u, dn = (_linear(mlp, n, where) for n in ("gate_proj", "up_proj", "down_proj"))
    if g.out_features != u.out_features or dn.in_features != g.out_features:
        raise ValueError(f"{where}: gate/up/down widths {g.out_features}/{u.out_features}/{dn.in_features} disagree")
    if g.out_features % world:
        raise ValueError(f"{where}: MLP width {g.out_features} does not divide by tensor-parallel size {world}")


def _plan_mlp(mlp: nn.Module, world: int, where: str) -> _MlpPlan:
    experts = getattr(mlp, "experts", None)
    if experts is None:
        _check_dense(mlp, world, where)
        return _MlpPlan("dense", mlp, [mlp], None)
    dense: list[nn.Module] = []
    for name in ("shared_experts", "shared_expert"):
        shared = getattr(mlp, name, None)
        if shared is not None:
            _check_dense(shared, world, f"{where}.{name}")
            dense.append(shared)
    if isinstance(experts, nn.ModuleList):
        for i, e in enumerate(experts):
            _check_dense(e, world, f"{where}.experts.{i}")
        return _MlpPlan("moe", mlp, dense + list(experts), None)
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    layout_ok = (not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
                 and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True))
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3 and layout_ok):
        raise ValueError(f"{where}.experts: only fused [E, 2I, D] / [E, D, I] expert weights without biases are supported")
    E, two_i, D = gu.shape
    if two_i % 2 or tuple(dn.shape) != (E, D, two_i // 2):
        raise ValueError(f"{where}.experts: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} disagree")
    if (two_i // 2) % world:
        raise ValueError(f"{where}.experts: expert width {two_i // 2} does not divide by tensor-parallel size {world}")
    return _MlpPlan("moe", mlp, dense, experts)


# ------------------------------------------------------------------ in-place splitting
def _block(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous share of n items (n divisible by world)."""
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def _rows(n_heads: int, width: int, rank: int, world: int) -> slice:
    """Output rows of rank's heads in a [n_heads * width, in] projection."""
    h = _block(n_heads, rank, world)
    return slice(h.start * width, h.stop * width)


def _column_parallel(lin: nn.Linear, rows: slice) -> None:
    """Keep output rows ``rows`` (and their bias); a copy, so the full weight is freed."""
    lin.weight = nn.Parameter(lin.weight.data[rows].clone(), requires_grad=False)  # [out/W, in]
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[rows].clone(), requires_grad=False)  # [out/W]
    lin.out_features = lin.weight.shape[0]


def _row_parallel(lin: nn.Linear, cols: slice, group: Any) -> RowParallelLinear:
    w = lin.weight.data[:, cols].clone()  # [out, in/W]
    b = lin.bias.data.clone() if lin.bias is not None else None
    return RowParallelLinear(w, b, group).to(lin.weight.device)


def _shard_attention(p: _AttnPlan, rank: int, world: int, group: Any) -> None:
    a = p.module
    if p.kind == "mha":
        _column_parallel(a.q_proj, _rows(p.heads, p.q_width, rank, world))
        _column_parallel(a.k_proj, _rows(p.kv_heads, p.kv_width, rank, world))
        _column_parallel(a.v_proj, _rows(p.kv_heads, p.v_width, rank, world))
    else:
        q = a.q_b_proj if getattr(a, "q_b_proj", None) is not None else a.q_proj
        _column_parallel(q, _rows(p.heads, p.q_width, rank, world))
        _column_parallel(a.kv_b_proj, _rows(p.heads, p.kv_width, rank, world))
    a.o_proj = _row_parallel(a.o_proj, _rows(p.heads, p.v_width, rank, world), group)
    for name in _HEAD_ATTRS:
        value = a.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(a, name, value // world)


def _shard_dense(mlp: nn.Module, rank: int, world: int, group: Any, reduce: bool = True) -> None:
    """Gate/up column-parallel, down row-parallel + all-reduce over ``group``; ``reduce=False``
    leaves a partial sum (a shared expert or one expert of a MoE block, whose output is reduced
    once for the whole block)."""
    cols = _block(mlp.gate_proj.out_features, rank, world)
    _column_parallel(mlp.gate_proj, cols)
    _column_parallel(mlp.up_proj, cols)
    if not reduce:
        down = mlp.down_proj
        mlp.down_proj = nn.Linear(cols.stop - cols.start, down.out_features, bias=down.bias is not None,
                                  device=down.weight.device, dtype=down.weight.dtype).requires_grad_(False)
        mlp.down_proj.weight.data.copy_(down.weight.data[:, cols])  # [D, I/W]
        if down.bias is not None:  # added by rank 0 only: the block's all-reduce sums it once
            mlp.down_proj.bias.data.copy_(down.bias.data if rank == 0 else torch.zeros_like(down.bias.data))
    else:
        mlp.down_proj = _row_parallel(mlp.down_proj, cols, group)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = cols.stop - cols.start


def _shard_fused_experts(ex: nn.Module, rank: int, world: int) -> None:
    gu, dn = ex.gate_up_proj.data, ex.down_proj.data  # [E, 2I, D], [E, D, I]
    I = dn.shape[2]
    cols = _block(I, rank, world)
    gate, up = gu[:, :I], gu[:, I:]  # the concatenated layout: gate rows, then up rows
    ex.gate_up_proj = nn.Parameter(torch.cat([gate[:, cols], up[:, cols]], dim=1).contiguous(), requires_grad=False)  # [E, 2I/W, D]
    ex.down_proj = nn.Parameter(dn[:, :, cols].contiguous(), requires_grad=False)  # [E, D, I/W]
    if isinstance(getattr(ex, "intermediate_dim", None), int):
        ex.intermediate_dim = cols.stop - cols.start


def _reduce_output_hook(group: Any):
    """Forward hook completing a MoE block: its output (or the first item of a tuple) is this
    rank's partial sum [b, s, D]; the returned output is the all-reduced one."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        out = out.contiguous()  # collectives need contiguous memory (a no-op for the usual reshape)
        dist.all_reduce(out, group=group)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def shard_target(target: FrozenTarget, rank: int, world_size: int, group: Any = None) -> FrozenTarget:
    """Shard ``target`` in place for rank ``rank`` of ``world_size`` (see the module docstring) and
    return it. ``group`` is the ``torch.distributed`` process group of the ranks (None = default
    group), which must be initialised before ``world_size > 1`` sharding. ``world_size == 1`` is a
    no-op. Raises ValueError, before changing anything, for head counts or widths that do not
    divide by ``world_size`` and for layouts this module cannot split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a tensor-parallel group of size {world_size}")
    if tp_info(target) is not None:
        raise ValueError(f"the target is already sharded (rank, world size = {tp_info(target)})")
    if world_size == 1:
        return target
    cfg = target.config
    plans = []
    for i, layer in enumerate(target.layers):
        where = f"decoder layer {i}"
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise ValueError(f"{where} ({type(layer).__name__}) has no self_attn/mlp: not supported for tensor parallelism")
        plans.append((_plan_attention(attn, cfg, world_size, f"{where}.self_attn"), _plan_mlp(mlp, world_size, f"{where}.mlp")))
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("initialise torch.distributed (the tensor-parallel ranks' group) before shard_target")
    if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
        raise ValueError(f"shard_target(rank={rank}, world_size={world_size}) does not match the process group "
                         f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
    for attn_plan, mlp_plan in plans:
        _shard_attention(attn_plan, rank, world_size, group)
        if mlp_plan.kind == "dense":
            _shard_dense(mlp_plan.module, rank, world_size, group)
            continue
        for m in mlp_plan.dense:  # shared experts, per-expert modules: partial sums
            _shard_dense(m, rank, world_size, group, reduce=False)
        if mlp_plan.fused_experts is not None:
            _shard_fused_experts(mlp_plan.fused_experts, rank, world_size)
        mlp_plan.module.register_forward_hook(_reduce_output_hook(group))
    setattr(target.model, _MARK, (rank, world_size))
    return target
