"""The drafter training objective (DSpark paper Eq. 9–12, DeepSpec's loss) as pure functions.

Notation. A training sequence x_0..x_{S−1} carries a loss mask m (1 on the target's own generated
tokens). An *anchor* is a position p with m_p = m_{p+1} = 1. The block drafted at p has γ slots;
slot k = 1..γ predicts x_{p+k} (DSpark's block [x_p, MASK×(γ−1)] sits at positions p..p+γ−1,
slot 1 being the anchor's own next token). Slot k is *evaluated* while p+k < S and m_{p+k} = 1;
the evaluated slots of a block form a contiguous prefix (``eval_mask``).

* Teacher: p_t,k = softmax(lm_head(target last_hidden at p+k−1)) in fp32 at T = 1, the target's
  next-token distribution given the ground-truth prefix (:func:`teacher_probs`).
* Draft: p_d,k = softmax(z_k), z_k the drafter's slot-k logits from ``Drafter.train_forward``
  (Markov bias teacher-forced on the ground-truth previous tokens).
* Expected acceptance of slot k under rejection sampling: α_k = 1 − ½‖p_d,k − p_t,k‖₁.

Loss (:func:`loss_parts`, :func:`finalize`), each term a weighted mean over evaluated slots with
position weight w_k = exp(−(k−1)/decay):

    L = α_ce·L_ce + α_tv·L_tv + α_soft·L_soft + α_conf·L_conf
    L_ce   = −log p_d,k(x_{p+k})                  cross-entropy on the ground-truth token
    L_tv   = ‖p_d,k − p_t,k‖₁                      full L1 (= 2·TV, no ½, as DeepSpec's code)
    L_soft = −Σ_v p_t,k(v)·log p_d,k(v)            soft cross-entropy (DeepSpec's EAGLE-3 recipe)
    L_conf = BCE(σ(conf logit_k), c*_k),  c*_k = clamp(α_k, 0, 1), detached

Data-parallel normalisation. Every term is Σ(w·term)/Σw over the GLOBAL batch. A rank therefore
returns numerators and denominators (:class:`Parts`); :func:`all_reduce_parts` sums the
denominators (and, for logging, detached numerators) over the process group, and
:func:`finalize` returns ``world_size · Σ_i α_i·num_i/den_i``: the data-parallel gradient
average (DDP / DeepSpeed divide by the world size) is then exactly the gradient of the global
weighted mean. Metrics use the same reducible :class:`Parts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from dspark.platform.config import StrictModel

__all__ = [
    "LOSS_TERMS",
    "KIND_DEFAULTS",
    "LossWeights",
    "LossConfig",
    "Parts",
    "sample_anchors",
    "block_targets",
    "teacher_probs",
    "position_weights",
    "expected_acceptance",
    "loss_terms",
    "loss_parts",
    "metric_parts",
    "all_reduce_parts",
    "finalize",
]

#: loss terms, in the order of :attr:`Parts.num` for a loss
LOSS_TERMS = ("ce", "tv", "soft_ce", "conf")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Resolved loss weights of one drafter kind."""

    ce: float  # α_ce
    tv: float  # α_tv
    soft_ce: float  # α_soft
    conf: float  # α_conf (a drafter without a confidence head simply has no L_conf)
    decay: float  # w_k = exp(−(k−1)/decay)
    detach_confidence: bool  # confidence head trained on detached inputs (its loss moves only the head)

    def alphas(self) -> tuple[float, ...]:  # in LOSS_TERMS order
        return (self.ce, self.tv, self.soft_ce, self.conf)


#: 0.8^(k−1) written as exp(−(k−1)/decay)
_EAGLE_DECAY = 1.0 / math.log(1.0 / 0.8)

#: Per-kind defaults.
#: * dspark: DeepSpec's DSpark config (α_ce 0.1, α_tv 0.9, α_conf 1.0, decay 4.0 — the code's value;
#:   the paper writes decay = γ). The confidence loss reaches the backbone (no stop-gradient).
#: * dflash: DeepSpec's DFlash baseline, CE only.
#: * eagle3, mtp1: DeepSpec's EAGLE-3 recipe, soft CE against p_t with step weights 0.8^(k−1)
#:   (MTP-1 drafts one token, so only its first weight matters). Distilling the full teacher
#:   distribution suits a drafter trained on the target's own text better than hard labels.
#: Baselines train no confidence by default (DeepSpec's have none); with α_conf > 0 their head is
#: trained on detached inputs, so their drafting objective stays the baseline's own.
KIND_DEFAULTS: dict[str, LossWeights] = {
    "dspark": LossWeights(ce=0.1, tv=0.9, soft_ce=0.0, conf=1.0, decay=4.0, detach_confidence=False),
    "dflash": LossWeights(ce=1.0, tv=0.0, soft_ce=0.0, conf=0.0, decay=4.0, detach_confidence=True),
    "eagle3": LossWeights(ce=0.0, tv=0.0, soft_ce=1.0, conf=0.0, decay=_EAGLE_DECAY, detach_confidence=True),
    "mtp1": LossWeights(ce=0.0, tv=0.0, soft_ce=1.0, conf=0.0, decay=_EAGLE_DECAY, detach_confidence=True),
}


class LossConfig(StrictModel):
    """The training objective. ``None`` means the drafter kind's default (:data:`KIND_DEFAULTS`)."""

    num_anchors: int = Field(512, ge=1, le=65536, description="Anchors (blocks) drawn per sequence (DeepSpec: 512).")
    ce_weight: float | None = Field(None, ge=0, le=1000, description="α_ce: cross-entropy on the ground-truth token.")
    tv_weight: float | None = Field(None, ge=0, le=1000, description="α_tv: full L1 ‖p_d − p_t‖₁ (= 2·TV).")
    soft_ce_weight: float | None = Field(
        None, ge=0, le=1000, description="α_soft: soft cross-entropy −Σ p_t·log p_d against the teacher."
    )
    confidence_weight: float | None = Field(
        None, ge=0, le=1000, description="α_conf: BCE of the confidence head to c* = 1 − ½‖p_d − p_t‖₁."
    )
    decay: float | None = Field(
        None, gt=0, le=1e6, description="Position weights w_k = exp(−(k−1)/decay) (DSpark 4.0; 0.8^(k−1) for EAGLE-3)."
    )
    detach_confidence: bool | None = Field(
        None, description="Train the confidence head on detached inputs (its loss then moves only the head)."
    )

    @model_validator(mode="after")
    def _check_some_weight(self) -> "LossConfig":
        given = (self.ce_weight, self.tv_weight, self.soft_ce_weight, self.confidence_weight)
        if all(w is not None for w in given) and not any(given):
            raise ValueError("at least one loss weight must be positive")
        return self

    def resolve(self, kind: str) -> LossWeights:
        """The weights for drafter ``kind`` (``DrafterConfig.kind``): explicit fields win."""
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"no loss defaults for drafter kind {kind!r}; known: {sorted(KIND_DEFAULTS)}")
        base = KIND_DEFAULTS[kind]
        over = {
            "ce": self.ce_weight, "tv": self.tv_weight, "soft_ce": self.soft_ce_weight,
            "conf": self.confidence_weight, "decay": self.decay, "detach_confidence": self.detach_confidence,
        }
        out = replace(base, **{k: v for k, v in over.items() if v is not None})
        if not any(out.alphas()):
            raise ValueError(f"every loss weight is 0 for drafter kind {kind!r}")
        return out


# ---------------------------------------------------------------------------------------------
# Anchors and targets
# ---------------------------------------------------------------------------------------------


def sample_anchors(
    loss_mask: torch.Tensor,  # [B, S] bool
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # anchors [B, A] int64, keep [B, A] bool
    """Up to ``num_anchors`` anchors per sequence, uniformly without replacement, sorted.

    Position i is valid iff m_i and m_{i+1} (i+1 < S). A = min(num_anchors, the most valid
    positions of any sequence), at least 1. A sequence with fewer valid positions than A gets
    them all, then unused slots (keep False, anchor 0) at the end. Deterministic given
    ``generator`` (which must live on ``loss_mask``'s device).

    Example: m = [[0 1 1 1 0 1]] → valid {1, 2}; num_anchors 4 → anchors [[1 2]], keep [[T T]].
    """
    assert loss_mask.ndim == 2 and num_anchors >= 1, (loss_mask.shape, num_anchors)
    m = loss_mask.bool()
    b, s = m.shape
    valid = torch.zeros_like(m)
    valid[:, :-1] = m[:, :-1] & m[:, 1:]
    a = max(1, min(num_anchors, int(valid.sum(1).max()) if b else 0))
    # a uniformly random subset = the a smallest of i.i.d. uniform scores; invalid positions score 2
    scores = torch.rand(b, s, generator=generator, device=m.device)
    scores = torch.where(valid, scores, torch.full_like(scores, 2.0))
    picked = scores.topk(a, dim=1, largest=False).indices  # [B, A]
    keep = valid.gather(1, picked)
    pos = torch.where(keep, picked, torch.full_like(picked, s)).sort(dim=1).values  # kept first, ascending
    keep = pos < s
    return torch.where(keep, pos, torch.zeros_like(pos)), keep


def block_targets(
    input_ids: torch.Tensor,  # [B, S] int64
    loss_mask: torch.Tensor,  # [B, S] bool
    anchors: torch.Tensor,  # [B, A] int64
    keep: torch.Tensor,  # [B, A] bool
    gamma: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # labels [B, A, γ] int64, eval_mask [B, A, γ] bool
    """Slot k of the block at p predicts x_{p+k}; ``eval_mask`` is the contiguous prefix of slots
    with p+k < S, m_{p+k} = 1 (and keep). Labels past the sequence end are 0 (never evaluated).

    Example: x = [10 11 12 13 14], m = [1 1 1 0 1], p = 1, γ = 3 → labels [12 13 14],
    eval_mask [T F F] (slot 2 leaves the loss mask, so slot 3 is cut too).
    """
    assert input_ids.ndim == 2 and loss_mask.shape == input_ids.shape, (input_ids.shape, loss_mask.shape)
    assert anchors.ndim == 2 and keep.shape == anchors.shape and anchors.shape[0] == input_ids.shape[0]
    b, s = input_ids.shape
    pos = anchors[..., None] + torch.arange(1, gamma + 1, device=anchors.device)  # [B, A, γ]
    inside = pos < s
    flat = pos.clamp(max=s - 1).reshape(b, -1)  # [B, A·γ]
    labels = input_ids.gather(1, flat).view(pos.shape)
    labels = torch.where(inside, labels, torch.zeros_like(labels))
    ok = inside & loss_mask.bool().gather(1, flat).view(pos.shape) & keep.bool()[..., None]
    return labels.to(torch.int64), ok.to(torch.int64).cumprod(-1).bool()


@torch.no_grad()
def teacher_probs(
    last_hidden: torch.Tensor,  # [B, S, d] target final-norm hidden states
    lm_head: Callable[[torch.Tensor], torch.Tensor],  # the target's (frozen) LM head, d → V
    anchors: torch.Tensor,  # [B, A] int64
    gamma: int,
) -> torch.Tensor:  # [B, A, γ, V] float32
    """p_t for every block slot: slot k reads the target at p+k−1 (its next-token distribution
    given the true prefix), softmax in fp32 at T = 1. Slots past the end reuse the last row."""
    assert last_hidden.ndim == 3 and anchors.ndim == 2, (last_hidden.shape, anchors.shape)
    b, s, d = last_hidden.shape
    pos = (anchors[..., None] + torch.arange(gamma, device=anchors.device)).clamp(max=s - 1)  # [B, A, γ]
    h = last_hidden.gather(1, pos.reshape(b, -1, 1).expand(-1, -1, d))  # [B, A·γ, d]
    logits = lm_head(h).float()  # [B, A·γ, V]
    return logits.softmax(-1).view(*pos.shape, -1)


def position_weights(gamma: int, decay: float, device: torch.device | None = None) -> torch.Tensor:  # [γ]
    """w_k = exp(−(k−1)/decay), k = 1..γ (decay 4, γ 7: 1, .779, .607, .472, .368, .287, .223)."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float32, device=device) / decay)


def expected_acceptance(
    logits: torch.Tensor,  # [..., V] draft logits
    target_probs: torch.Tensor,  # [..., V] p_t
) -> torch.Tensor:  # [...] float32 α = 1 − ½‖p_d − p_t‖₁
    """Probability that a token sampled from p_d = softmax(logits) passes rejection sampling
    against p_t (T = 1): Σ_v min(p_d, p_t) = 1 − TV."""
    assert logits.shape == target_probs.shape, (logits.shape, target_probs.shape)
    return 1.0 - 0.5 * (logits.float().softmax(-1) - target_probs.float()).abs().sum(-1)


# ---------------------------------------------------------------------------------------------
# Reducible sums
# ---------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """Named weighted means Σnum/Σden that add across micro-batches and data-parallel ranks.

    ``num`` is this rank's own (a loss's numerators carry autograd); ``den`` never has a grad.
    After :func:`all_reduce_parts`, ``den`` and ``num_total`` are global sums and ``world_size``
    is the group size; before it, the parts describe this rank alone.
    """

    names: tuple[str, ...]
    num: torch.Tensor  # [T] float32
    den: torch.Tensor  # [T] float32
    num_total: torch.Tensor | None = None  # [T] detached global numerators (None: not reduced)
    world_size: int = 1

    def __post_init__(self) -> None:
        assert self.num.shape == self.den.shape == (len(self.names),), (self.names, self.num.shape, self.den.shape)

    def __add__(self, other: "Parts") -> "Parts":
        """Sum of two unreduced parts (two micro-batches, or two ranks' shares of a batch)."""
        if other.names != self.names or self.num_total is not None or other.num_total is not None:
            raise ValueError(f"can add only unreduced parts with the same names: {self.names} vs {other.names}")
        return Parts(self.names, self.num + other.num, self.den + other.den)

    def with_totals(self, num_total: torch.Tensor, den_total: torch.Tensor, world_size: int) -> "Parts":
        """These local numerators with the group's totals (what :func:`all_reduce_parts` returns)."""
        return Parts(self.names, self.num, den_total.detach(), num_total.detach(), int(world_size))

    def values(self) -> dict[str, float]:
        """Global means num/den (local ones before reduction); names with den 0 are left out.
        Reads the values back to the host (a device sync)."""
        num = (self.num_total if self.num_total is not None else self.num.detach()).tolist()
        return {n: x / y for n, x, y in zip(self.names, num, self.den.tolist()) if y > 0}


def all_reduce_parts(parts: Parts, group=None) -> Parts:
    """Sum ``den`` and the detached ``num`` over ``group`` (one all-reduce); without an
    initialised process group this rank is the whole world."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return parts.with_totals(parts.num.detach(), parts.den, 1)
    t = len(parts.names)
    buf = torch.cat([parts.num.detach().float(), parts.den.float()])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return parts.with_totals(buf[:t], buf[t:], dist.get_world_size(group))


# ---------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------


def loss_terms(
    logits: torch.Tensor,  # [..., V] float32 drafter logits z_k
    target_probs: torch.Tensor,  # [..., V] float32 p_t
    labels: torch.Tensor,  # [...] int64 ground-truth x_{p+k}
    eval_mask: torch.Tensor,  # [...] bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # ce, l1, soft: [N] over evaluated slots, row-major
    """Per evaluated slot: L_ce = −log p_d(x), ‖p_d − p_t‖₁ and −Σ p_t·log p_d (see the module docstring)."""
    # Fast path: dspark.kernels.loss computes the same three terms (and their gradient) in vocabulary
    # tiles without materialising any [N, V] softmax, when the kernel dispatcher picks Triton for
    # these tensors (CUDA by default). Every CPU call runs the reference lines below, unchanged.
    from dspark.kernels.dispatch import use_triton

    if use_triton(logits) and not target_probs.requires_grad:
        from dspark.kernels.loss import loss_terms_triton

        return loss_terms_triton(logits, target_probs, labels, eval_mask)
    logp = logits[eval_mask].float().log_softmax(-1)  # [N, V]
    p_t = target_probs[eval_mask].float()  # [N, V]
    ce = -logp.gather(-1, labels[eval_mask][:, None]).squeeze(-1)  # [N]
    l1 = (logp.exp() - p_t).abs().sum(-1)  # [N]
    soft = -(p_t * logp).sum(-1)  # [N]
    return ce, l1, soft


def loss_parts(
    logits: torch.Tensor,  # [B, A, γ, V] float32 drafter logits z_k
    target_probs: torch.Tensor,  # [B, A, γ, V] float32 p_t (teacher_probs)
    labels: torch.Tensor,  # [B, A, γ] int64 ground-truth x_{p+k}
    eval_mask: torch.Tensor,  # [B, A, γ] bool
    confidence_logits: torch.Tensor | None,  # [B, A, γ] float32, or None without a head
    decay: float,
) -> Parts:  # names LOSS_TERMS
    """Numerators Σ w_k·term and denominators Σ w_k over evaluated slots, per term (see the module
    docstring). Only evaluated rows are computed. ``conf`` has den 0 when there is no head."""
    assert logits.ndim == 4 and target_probs.shape == logits.shape, (logits.shape, target_probs.shape)
    assert labels.shape == eval_mask.shape == logits.shape[:3], (labels.shape, eval_mask.shape, logits.shape)
    w = position_weights(logits.shape[2], decay, logits.device).expand(eval_mask.shape)[eval_mask]  # [N]
    ce, l1, soft = loss_terms(logits, target_probs, labels, eval_mask)  # [N] each
    den = w.sum()
    nums = [(w * ce).sum(), (w * l1).sum(), (w * soft).sum()]
    if confidence_logits is not None:
        assert confidence_logits.shape == eval_mask.shape, (confidence_logits.shape, eval_mask.shape)
        c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)  # [N]
        bce = F.binary_cross_entropy_with_logits(confidence_logits[eval_mask].float(), c_star, reduction="none")
        nums.append((w * bce).sum())
        dens = den.detach().repeat(4)
    else:
        nums.append(den.new_zeros(()))
        dens = torch.cat([den.detach().repeat(3), den.new_zeros(1)])
    return Parts(LOSS_TERMS, torch.stack(nums), dens)


@torch.no_grad()
def metric_parts(
    accept: torch.Tensor,  # [B, A, γ] float32 α_k (expected_acceptance)
    eval_mask: torch.Tensor,  # [B, A, γ] bool
    confidence_logits: torch.Tensor | None = None,  # [B, A, γ] float32
) -> Parts:
    """Training metrics as reducible sums (means over evaluated slots unless noted):

    * ``accept_rate@k``: mean α_k at slot k;
    * ``tau_probabilistic``: per block 1 + Σ_k Π_{j≤k} α_j (unevaluated α = 0), mean over blocks
      with an evaluated first slot — the expected accepted length including the bonus token;
    * ``confidence_abs_error`` / ``confidence_bias``: mean |c − c*| and mean (c − c*),
      c = σ(logit), c* = clamp(α, 0, 1);
    * ``confidence_cumprod_bias``: mean (Π_{j≤k} c_j − Π_{j≤k} c*_j), the bias of the prefix
      survival a_k that the scheduler uses.
    """
    assert accept.shape == eval_mask.shape and accept.ndim == 3, (accept.shape, eval_mask.shape)
    gamma = accept.shape[2]
    m = eval_mask.float()
    alpha = accept.float() * m  # [B, A, γ]
    names = [f"accept_rate@{k + 1}" for k in range(gamma)] + ["tau_probabilistic"]
    nums = [alpha.sum((0, 1))]  # [γ]
    dens = [m.sum((0, 1))]
    blocks = eval_mask[..., 0]  # [B, A]
    tau = 1.0 + alpha.cumprod(-1).sum(-1)  # [B, A]
    nums.append(tau[blocks].sum()[None])
    dens.append(blocks.sum().float()[None])
    if confidence_logits is not None:
        assert confidence_logits.shape == accept.shape, (confidence_logits.shape, accept.shape)
        c = torch.sigmoid(confidence_logits.float())
        c_star = accept.float().clamp(0.0, 1.0)
        diff = c - c_star  # [B, A, γ]
        cum = c.cumprod(-1) - c_star.cumprod(-1)
        names += ["confidence_abs_error", "confidence_bias", "confidence_cumprod_bias"]
        nums.append(torch.stack([(diff.abs() * m).sum(), (diff * m).sum(), (cum * m).sum()]))
        dens.append(m.sum().repeat(3))
    return Parts(tuple(names), torch.cat(nums), torch.cat(dens))


def finalize(parts: Parts, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, logged values) from loss parts, reduced or not.

    loss = world_size · Σ_i α_i·num_i/den_i with this rank's numerators and the (global)
    denominators; the values are the global per-term means and ``loss`` = Σ_i α_i·mean_i.
    """
    assert parts.names == LOSS_TERMS, parts.names
    alpha = torch.tensor(weights.alphas(), dtype=torch.float32, device=parts.num.device)
    den = parts.den.to(parts.num.device)
    ratio = torch.where(den > 0, parts.num / den.clamp_min(1e-12), torch.zeros_like(parts.num))
    loss = parts.world_size * (alpha * ratio).sum()
    values = parts.values()
    values["loss"] = sum(a * values.get(n, 0.0) for a, n in zip(weights.alphas(), LOSS_TERMS))
    return loss, values
