"""Step-cost profiles: SPS(B), the verifier's steps per second as a function of the number of
tokens B = Σ_r (1 + ℓ_r) one verify forward processes. Pure Python/numpy, no torch (measuring
one needs the engine: ``dspark.verifier_service.profiling.measure_sps``).

A profile is a table of measured points (B_i, SPS_i), read by piecewise-linear interpolation
and held flat beyond the first and last point. Real GPU curves are step-wise ("jagged"): the
cost jumps where the token count crosses a matmul tile or wave boundary (multiples of 64/128)
and is flat in between. A table represents such a jump exactly by carrying both sides of it, e.g.
(128, 190.0) and (129, 160.0): every integer B then reads the right plateau, because policies only
ever ask for integer B. :func:`h100_like` builds such a curve for the simulator.

File format (JSON, one object; ``SPSProfile.save`` / ``SPSProfile.load``)::

    {"format": "dspark.sps/1",
     "target": "demo", "config_hash": "3f2a...", "device": "cuda:0", "dtype": "bfloat16",
     "max_batch": 64, "source": "measured",
     "points": [[1, 190.2], [8, 189.7], ...],      # [B, steps/s], B strictly increasing
     "draft_points": [[1, 0.0011], [8, 0.0012], ...]}   # optional: [R, seconds per draft pass]

**Draft cost.** A speculative step costs a draft pass over the R drafting requests *plus* the
verify forward: step time = draft_s(R) + 1 / SPS(B). ``draft_points`` hold draft_s(R) (read the
same way: linear between points, flat beyond); a profile without them prices drafting at 0, which
is the paper's Θ = τ·SPS(B). The policies use it twice: before drafting, to decide whether a draft
pass pays at all (it does not when the target is cheap next to the drafter, or the batch is
compute-bound), and after drafting, where it is a sunk cost that makes verifying more tokens
relatively cheaper (see ``dspark.scheduler.prefix``).

The identity fields say which engine the numbers belong to; a profile measured for another
target, device, dtype or batch limit should be measured again (:meth:`SPSProfile.matches`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["FORMAT", "SPSProfile", "StepCurve", "evaluate_sps", "draft_seconds", "h100_like"]

FORMAT = "dspark.sps/1"

# Anything a policy can read SPS(B) from: a profile, or a function of B (scalar or array).
StepCurve = Callable[[np.ndarray], np.ndarray]

_IDENTITY = ("target", "config_hash", "device", "dtype", "max_batch")


@dataclass(frozen=True, eq=False)
class SPSProfile:
    """Measured (or synthetic) steps/second per batch token count, with the engine's identity."""

    tokens: tuple[int, ...]  # [P] batch token counts B, strictly increasing, >= 1
    steps_per_s: tuple[float, ...]  # [P] finite, > 0
    target: str = ""  # target name or checkpoint path
    config_hash: str = ""  # hash of the target's model config
    device: str = ""
    dtype: str = ""
    max_batch: int = 0  # the engine's max_batch_size when measured (0 = unknown)
    source: str = ""  # "measured", "synthetic:h100_like", ...
    # [D] (R drafting requests, seconds per draft pass), R strictly increasing; () = not measured
    draft_points: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(b) for b in self.tokens))
        object.__setattr__(self, "steps_per_s", tuple(float(s) for s in self.steps_per_s))
        object.__setattr__(self, "draft_points", tuple((int(r), float(t)) for r, t in sorted(self.draft_points)))
        d = self.draft_points
        if any(r < 1 for r, _ in d) or any(a[0] >= b[0] for a, b in zip(d, d[1:])):
            raise ValueError("draft points need distinct request counts >= 1")
        if not all(math.isfinite(t) and t >= 0 for _, t in d):
            raise ValueError("draft seconds must be finite and >= 0")
        t, s = self.tokens, self.steps_per_s
        if not t or len(t) != len(s):
            raise ValueError(f"need one steps/s value per token count (got {len(t)} and {len(s)})")
        if t[0] < 1 or any(b >= c for b, c in zip(t, t[1:])):
            raise ValueError("token counts must be >= 1 and strictly increasing")
        if not all(math.isfinite(x) and x > 0 for x in s):
            raise ValueError("steps/s values must be finite and > 0")
        if self.max_batch < 0:
            raise ValueError("max_batch must be >= 0")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_points(cls, points: Sequence[tuple[int, float]], **identity) -> "SPSProfile":
        """From (B, steps/s) pairs in any order (sorted here)."""
        pts = sorted((int(b), float(s)) for b, s in points)
        return cls(tuple(b for b, _ in pts), tuple(s for _, s in pts), **identity)

    @classmethod
    def from_step_times(cls, tokens: Sequence[int], seconds: Sequence[float], **identity) -> "SPSProfile":
        """From measured seconds per step at each token count (SPS = 1 / seconds)."""
        return cls.from_points([(b, 1.0 / float(t)) for b, t in zip(tokens, seconds)], **identity)

    # -- reading -------------------------------------------------------------------------------
    def __call__(self, tokens):
        """SPS at batch token count(s) B (scalar or array): linear between points, flat beyond."""
        out = np.interp(np.asarray(tokens, dtype=np.float64), self.tokens, self.steps_per_s)
        return float(out) if np.ndim(out) == 0 else out

    def step_time_s(self, tokens):
        """Seconds per verify forward at B (1 / SPS)."""
        return 1.0 / np.asarray(self(tokens))

    def draft_time_s(self, requests: int) -> float:
        """Seconds of one draft pass over ``requests`` drafting requests (0 when not measured or
        nobody drafts); linear between the draft points, flat beyond."""
        if not self.draft_points or requests <= 0:
            return 0.0
        rows, secs = zip(*self.draft_points)
        return float(np.interp(float(requests), rows, secs))

    def with_draft_points(self, points: Sequence[tuple[int, float]]) -> "SPSProfile":
        """The same profile with draft cost ``points`` [(R, seconds)]."""
        return dataclasses.replace(self, draft_points=tuple(points))

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in _IDENTITY}

    def matches(self, **identity) -> bool:
        """True when every given identity field equals this profile's (unknown fields ignored)."""
        return all(getattr(self, k) == v for k, v in identity.items() if k in _IDENTITY)

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT, **self.identity(), "source": self.source,
             "points": [[b, s] for b, s in zip(self.tokens, self.steps_per_s)]}
        if self.draft_points:
            d["draft_points"] = [[r, t] for r, t in self.draft_points]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SPSProfile":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an SPS profile (format {d.get('format')!r}, expected {FORMAT!r})")
        unknown = set(d) - {"format", "points", "draft_points", "source", *_IDENTITY}
        if unknown:
            raise ValueError(f"unknown fields in SPS profile: {sorted(unknown)}")
        ident = {k: d[k] for k in (*_IDENTITY, "source") if k in d}
        draft = tuple(tuple(p) for p in d.get("draft_points", ()))
        return cls.from_points([tuple(p) for p in d["points"]], draft_points=draft, **ident)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "SPSProfile":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def evaluate_sps(sps: SPSProfile | Callable, tokens: np.ndarray) -> np.ndarray:
    """SPS at each B of ``tokens`` [N] -> [N] float64, for a profile or any function of B."""
    tokens = np.asarray(tokens, dtype=np.int64)  # [N]
    if isinstance(sps, SPSProfile):
        return np.asarray(sps(tokens), dtype=np.float64).reshape(tokens.shape)
    return np.asarray([float(sps(int(b))) for b in tokens], dtype=np.float64).reshape(tokens.shape)


def draft_seconds(sps: SPSProfile | Callable, requests: int) -> float:
    """Seconds of a draft pass over ``requests`` drafting requests: the profile's draft cost, or 0
    for a bare function of B (which prices the verify forward only)."""
    return sps.draft_time_s(requests) if isinstance(sps, SPSProfile) else 0.0


def h100_like(
    max_tokens: int = 8192,
    *,
    overhead_ms: float = 1.0,
    weight_read_ms: float = 5.5,
    tile: int = 128,
    tile_ms: float = 1.1,
    wave: int = 64,
    wave_ms: float = 0.05,
    draft_ms: float = 0.8,
    draft_row_ms: float = 0.004,
    max_requests: int = 1024,
) -> SPSProfile:
    """A synthetic step-wise SPS curve with the shape of a dense ~8B target on one H100.

    Cost of a step with B tokens, in ms::

        overhead + max(weight_read, tile_ms · ⌈B / tile⌉) + wave_ms · ⌈B / wave⌉

    Small batches are memory-bound (the weights are read once per step, whatever B: the GPU is
    idle and SPS is flat), large ones compute-bound in whole 128-token tiles (SPS drops in
    steps), with a smaller step at every 64-token wave. The numbers give the shape only, not a
    measurement. The table carries both sides of every wave edge (B = 64k and 64k + 1), so
    every integer B reads its plateau exactly.

    Draft cost: ``draft_ms + draft_row_ms · R`` for R drafting requests (a small parallel drafter
    is launch- and weight-read-bound: nearly flat), on R = 1..``max_requests``.
    """
    if max_tokens < 1 or tile < 1 or wave < 1:
        raise ValueError("max_tokens, tile and wave must be >= 1")

    def cost_ms(b: int) -> float:
        return overhead_ms + max(weight_read_ms, tile_ms * math.ceil(b / tile)) + wave_ms * math.ceil(b / wave)

    edges = {1, max_tokens}
    for k in range(1, max_tokens // wave + 1):
        edges.update(x for x in (k * wave, k * wave + 1) if x <= max_tokens)
    points = [(b, 1e3 / cost_ms(b)) for b in sorted(edges)]
    draft = [(r, 1e-3 * (draft_ms + draft_row_ms * r)) for r in sorted({1, max(1, max_requests)})]
    return SPSProfile.from_points(points, target="synthetic", device="h100-like", dtype="bfloat16",
                                  source="synthetic:h100_like", draft_points=tuple(draft))
