"""Records that cross component (and later process) boundaries.

Small frozen dataclasses, standard library only, validated on construction so that a bad value
is refused where it enters, with a reason. Tensors never travel in these records; the
drafter-to-verifier payload that must carry tensors is defined with the services that use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "SamplingParams", "GenerationRequest", "RequestStats", "RequestOutput", "assert_no_tensors"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = draws from a generator seeded by the engine's own counter
    stop: tuple[str, ...] = ()  # stop strings: generation ends once the text contains one
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (end-of-text is one unless ignore_eos)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer (got {self.max_tokens!r})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            problems.append(f"temperature must be in [0, 100] (got {self.temperature!r})")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer (got {self.top_k!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer (got {self.seed!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 for t in self.prompt_token_ids):
            raise ValueError(f"request {self.request_id!r}: prompt token ids must be non-negative integers")


@dataclass(frozen=True)
class RequestStats:
    """Speculation statistics of one request.

    ``steps`` verify steps each emit ``accepted_k + 1`` tokens (the +1 is the target's own token:
    recovered after a rejection or the bonus after full acceptance), so
    τ = (accepted + steps) / steps. ``proposed_at[k]`` counts steps that verified at least k+1
    drafts and ``accepted_at[k]`` those that accepted at least k+1: accept@k = accepted_at/proposed_at.
    """

    steps: int = 0
    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0
    proposed_at: tuple[int, ...] = ()
    accepted_at: tuple[int, ...] = ()
    fallback_steps: int = 0  # steps decoded without drafts because the drafter failed

    @property
    def tau(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def accept_rate_at(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted_at, self.proposed_at)]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]  # emitted by this step
    token_ids: tuple[int, ...]  # all generated so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stats: RequestStats


def assert_no_tensors(obj: Any) -> None:
    """Raise TypeError if a tensor (anything with ``.shape`` and ``.dtype``) hides in ``obj``."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            raise TypeError(f"tensor-like {type(x).__name__} in a record that must carry none")
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif hasattr(x, "__dataclass_fields__"):
            stack.extend(getattr(x, f) for f in x.__dataclass_fields__)
