"""Scheduling simulator: replay recorded verify steps against step-cost (SPS) curves, so verify-length
policies can be compared at concurrencies and replica counts this machine cannot run.

Inputs: a trace (``dspark.verifier_service.trace``) reduced to :class:`Trajectories` (per recorded
request, in step order: the drafted block's confidences c_{1..γ} and the full-block acceptance a),
an SPS curve (verifier steps/s as a function of the step's batch tokens B) and a policy.

Model, per replica, per simulated step, for its R running requests:

* each request takes the next row of its trajectory: confidences [γ] and full-block acceptance a;
* the policy picks ℓ_r from the [R, γ] confidences; the request accepts min(a_r, ℓ_r) drafts
  (acceptance is prefix-closed, see the trace module) and emits min(a_r, ℓ_r) + 1 tokens;
* before that, the policy's pre-draft ``plan`` decides whether the step drafts at all (``off``
  never does; ``prefix``/``async`` skip the draft pass when it would not pay); a step that does
  not draft verifies nothing;
* the step costs d(R) + 1 / SPS(B) seconds with B = Σ_r (1 + ℓ_r) and d(R) the profile's draft
  pass over the R requests (``draft_points``), charged only when the step drafted;
* a request whose trajectory ends finishes and a new one takes its place at once (concurrency
  stays constant), its trajectory drawn uniformly by a seeded RNG. At the start every request sits
  on a uniformly drawn row, i.e. at a random point of a random request: the steady-state mix.

Goodput = emitted tokens / simulated time. Replicas run side by side, so the cluster's goodput is
the sum of the replicas' (``C`` requests spread as evenly as possible over ``N`` replicas).

Trajectories advance one row per step whatever the policy, so the requests' draws (and the RNG
stream) are the same for every policy at a given (seed, concurrency, replicas): policies are
compared on identical inputs. The price is an approximation: a request that verifies a shorter
prefix would, in reality, draft its next block from a different position; here it takes the
recorded next block. A profile without draft points prices drafting at 0, the paper's objective
Θ = τ·SPS(B); ``without_draft_cost`` strips them from one that has them.

Pure Python + numpy; no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dspark.scheduler import policies as _policies
from dspark.scheduler import registry as _registry
from dspark.scheduler.sps import draft_seconds

__all__ = [
    "SimulationError",
    "Trajectories",
    "PolicySpec",
    "parse_policies",
    "default_policies",
    "load_sps",
    "without_draft_cost",
    "build_policy",
    "as_sps",
    "spread",
    "simulate_replica",
    "ReplicaRun",
    "SimResult",
    "simulate",
    "run_grid",
    "render_markdown",
    "plot",
]

SPSCurve = Callable[[int], float]  # B batch tokens -> verifier steps/s


class SimulationError(ValueError):
    """The simulation cannot run as asked (message is for users)."""


# ------------------------------------------------------------------------------ trajectories
@dataclass(frozen=True)
class Trajectories:
    """Known trace rows grouped per recorded request, each group in step order."""

    gamma: int
    accepted: np.ndarray  # [N] int64 full-block acceptance a_n ∈ [0, γ]
    confidences: np.ndarray | None  # [N, γ] float64 c_{n,k}; None when the drafter has no confidence head
    starts: np.ndarray  # [T+1] int64: trajectory t is rows starts[t]:starts[t+1] (each non-empty)

    def __post_init__(self) -> None:
        n = self.accepted.shape[0]
        assert self.accepted.ndim == 1 and self.starts.ndim == 1 and self.starts[0] == 0 and self.starts[-1] == n
        assert np.all(np.diff(self.starts) > 0), "every trajectory must have at least one row"
        assert self.confidences is None or self.confidences.shape == (n, self.gamma), self.confidences.shape
        if n and (self.accepted.min() < 0 or self.accepted.max() > self.gamma):
            raise SimulationError(f"full-block acceptances must lie in [0, γ = {self.gamma}]")

    @classmethod
    def from_rows(
        cls,
        request: np.ndarray,  # [N] request index per row
        step: np.ndarray,  # [N] step index per row
        accepted: np.ndarray,  # [N] full-block acceptance
        confidences: np.ndarray | None,  # [N, γ]
        known: np.ndarray,  # [N] bool: rows to keep
        gamma: int,
    ) -> "Trajectories":
        keep = np.flatnonzero(np.asarray(known, dtype=bool))
        order = keep[np.lexsort((np.asarray(step)[keep], np.asarray(request)[keep]))]  # by request, then step
        req = np.asarray(request)[order]
        if order.size == 0:
            raise SimulationError("the trace has no usable rows (no step with a known full-block acceptance)")
        cut = np.flatnonzero(np.diff(req)) + 1
        starts = np.concatenate([[0], cut, [order.size]]).astype(np.int64)
        conf = None if confidences is None else np.asarray(confidences, dtype=np.float64)[order]
        return cls(int(gamma), np.asarray(accepted, dtype=np.int64)[order], conf, starts)

    @classmethod
    def from_lists(cls, gamma: int, accepted: Sequence[Sequence[int]], confidences: Sequence[Any] | None = None) -> "Trajectories":
        """Hand-made trajectories: ``accepted[t]`` is request t's a per step, ``confidences[t]`` its
        [n_t, γ] confidences."""
        lens = [len(a) for a in accepted]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        acc = np.concatenate([np.asarray(a, dtype=np.int64) for a in accepted])
        conf = None
        if confidences is not None:
            conf = np.concatenate([np.asarray(c, dtype=np.float64).reshape(-1, gamma) for c in confidences])
        return cls(int(gamma), acc, conf, starts)

    @property
    def num_rows(self) -> int:
        return int(self.accepted.shape[0])

    @property
    def num_trajectories(self) -> int:
        return int(self.starts.shape[0] - 1)

    def tau(self, length: int | None = None) -> float:
        """τ = mean(min(a, ℓ) + 1) over the rows for a fixed verify length ℓ (None = γ)."""
        ell = self.gamma if length is None else length
        return float(np.mean(np.minimum(self.accepted, ell) + 1.0))


# ------------------------------------------------------------------------------ policies and SPS
@dataclass(frozen=True)
class PolicySpec:
    """A policy as named on the command line: ``off``, ``fixed`` (γ of the trace), ``fixed:4``,
    ``threshold`` (0.5), ``threshold:0.3``, ``prefix``, ``async``."""

    name: str
    arg: float | None = None

    @property
    def label(self) -> str:
        if self.name == "fixed":
            return "fixed γ" if self.arg is None else f"fixed {int(self.arg)}"
        if self.name == "threshold":
            return f"threshold {0.5 if self.arg is None else self.arg:g}"
        return self.name


POLICY_NAMES = _registry.POLICY_NAMES


def parse_policies(text: str | Iterable[str], gamma: int) -> list[PolicySpec]:
    """``"off,fixed:2,fixed,prefix"`` -> specs; a fixed length above the trace's γ is refused."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        raise SimulationError("name at least one policy")
    out: list[PolicySpec] = []
    for item in items:
        name, _, arg = item.partition(":")
        if name not in POLICY_NAMES:
            raise SimulationError(
                f"unknown policy {item!r} (known: {', '.join(POLICY_NAMES)}; fixed:L and threshold:X take an argument)")
        if arg and name not in ("fixed", "threshold"):
            raise SimulationError(f"policy {name!r} takes no argument (got {item!r})")
        value: float | None = None
        if arg:
            try:
                value = int(arg) if name == "fixed" else float(arg)
            except ValueError:
                raise SimulationError(f"bad argument in {item!r}") from None
            if name == "fixed" and not 0 <= value <= gamma:
                raise SimulationError(
                    f"{item!r}: the trace drafts γ = {gamma} tokens per block, so a fixed length must be in 0..{gamma}")
            if name == "threshold" and not 0.0 <= value <= 1.0:
                raise SimulationError(f"{item!r}: a confidence threshold must be in [0, 1]")
        spec = PolicySpec(name, value)
        if spec in out:
            raise SimulationError(f"policy {item!r} is named twice")
        out.append(spec)
    return out


def default_policies(gamma: int) -> list[PolicySpec]:
    """off, fixed 2 / 4 (those below γ) and γ, threshold 0.5, prefix and async."""
    return [PolicySpec("off"), *[PolicySpec("fixed", n) for n in (2, 4) if n < gamma], PolicySpec("fixed"),
            PolicySpec("threshold"), PolicySpec("prefix"), PolicySpec("async")]


def load_sps(spec: str) -> tuple[Any, str]:
    """(profile, description) from ``"h100"`` (the synthetic H100-like step-wise curve) or a
    measured profile's JSON file, read by the policy registry's ``resolve_sps``."""
    if spec in ("h100", "h100_like"):
        return _registry.resolve_sps("h100_like"), "H100-like step-wise curve (synthetic)"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SimulationError(f"SPS profile {spec!r} is neither 'h100' nor an existing file")
    try:
        return _registry.resolve_sps(str(path)), f"measured profile {path.name}"
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, wrong format, bad points
        raise SimulationError(f"{path}: not a readable SPS profile: {exc}") from None


def without_draft_cost(profile: Any) -> Any:
    """The profile with its draft points removed (drafting then costs nothing)."""
    from dspark.scheduler.sps import SPSProfile

    return dataclasses.replace(profile, draft_points=()) if isinstance(profile, SPSProfile) else profile


def as_sps(profile: Any) -> SPSCurve:
    """A curve B -> steps/s: an ``SPSProfile`` (callable) or any function of B."""
    if not callable(profile):
        raise TypeError(f"not an SPS curve: {type(profile).__name__}")
    return profile


SCHEDULED_PARAMS = ("prior", "lag", "refresh")  # what ``policy_params`` may set


def build_policy(spec: PolicySpec, sps: SPSCurve, policy_params: dict[str, Any] | None = None) -> Any:
    """A fresh policy from the policy registry (policies may keep state across steps: build one
    per replica). ``prefix`` and ``async`` plan with the same SPS curve the simulation charges and
    take ``policy_params`` (prior, refresh; lag for async only)."""
    params: dict[str, Any] = {}
    extra = {k: v for k, v in (policy_params or {}).items() if v is not None}
    if set(extra) - set(SCHEDULED_PARAMS):
        raise SimulationError(f"unknown policy parameters {sorted(set(extra) - set(SCHEDULED_PARAMS))}")
    if spec.name == "fixed":
        params["length"] = None if spec.arg is None else int(spec.arg)
    elif spec.name == "threshold" and spec.arg is not None:
        params["threshold"] = float(spec.arg)
    elif spec.name in ("prefix", "async"):
        params.update({k: v for k, v in extra.items() if spec.name == "async" or k != "lag"})
    try:
        return _registry.build_policy(spec.name, sps=sps, **params)
    except ValueError as exc:  # pydantic's ValidationError included
        raise SimulationError(f"policy {spec.label!r}: {exc}") from None


def spread(concurrency: int, replicas: int) -> list[int]:
    """Requests per replica, as even as possible: spread(10, 4) == [3, 3, 2, 2]."""
    return [concurrency // replicas + (i < concurrency % replicas) for i in range(replicas)]


# ------------------------------------------------------------------------------ one replica
@dataclass(frozen=True)
class ReplicaRun:
    steps: int
    request_steps: int  # Σ over steps of R
    tokens: int  # emitted: Σ (min(a, ℓ) + 1)
    verified: int  # Σ ℓ
    batch_tokens: int  # Σ B
    seconds: float  # Σ (d(R)·[drafted] + 1 / SPS(B))
    drafted_steps: int = 0  # steps that ran a draft pass
    draft_seconds: float = 0.0  # the draft part of ``seconds``


def simulate_replica(
    traj: Trajectories,
    policy: Any,  # VerifyPolicy
    sps: SPSCurve,
    num_requests: int,
    steps: int,
    rng: np.random.Generator,
) -> ReplicaRun:
    """``steps`` verify steps of one replica that keeps ``num_requests`` requests running. The
    policy is asked through ``decide_lengths``, the engine's own entry point, with a
    :class:`BatchView` whose request ids stay fixed while a request runs (a replacement gets a
    new id), so stateful policies see requests come and go as in the engine."""
    assert num_requests >= 1 and steps >= 1
    R, g = num_requests, traj.gamma
    row_traj = np.repeat(np.arange(traj.num_trajectories), np.diff(traj.starts))  # [N] trajectory of each row
    ptr = rng.integers(traj.num_rows, size=R)  # [R] current row of each request (steady-state start)
    end = traj.starts[row_traj[ptr] + 1]  # [R] one past its trajectory's last row
    ids = [str(i) for i in range(R)]  # [R] request ids
    issued = R
    tokens = verified = batch_tokens = drafted_steps = 0
    seconds = draft_total = 0.0
    draft_s = draft_seconds(sps, R)
    for _ in range(steps):
        conf = traj.confidences[ptr] if traj.confidences is not None else None  # [R, γ]
        try:
            if _policies.should_draft(policy, _policies.BatchView(None, g, tuple(ids))):
                view = _policies.BatchView(conf, g, tuple(ids))
                ell = np.asarray(_policies.decide_lengths(policy, view), dtype=np.int64)  # [R]
                drafted_steps += 1
                draft_total += draft_s
                seconds += draft_s
            else:
                ell = np.zeros(R, dtype=np.int64)
        except ValueError as exc:
            raise SimulationError(f"policy {type(policy).__name__}: {exc}") from None
        assert ell.shape == (R,) and ell.min() >= 0 and ell.max() <= g, ell  # decide_lengths enforces the limits
        emitted = np.minimum(traj.accepted[ptr], ell) + 1  # [R]
        b = R + int(ell.sum())
        rate = float(sps(b))
        if not (rate > 0 and math.isfinite(rate)):
            raise SimulationError(f"the SPS curve gives {rate} steps/s at B = {b} tokens")
        tokens += int(emitted.sum())
        verified += int(ell.sum())
        batch_tokens += b
        seconds += 1.0 / rate
        ptr = ptr + 1
        done = np.flatnonzero(ptr >= end)
        if done.size:  # finished requests are replaced by new ones from their first row
            t = rng.integers(traj.num_trajectories, size=done.size)
            ptr[done], end[done] = traj.starts[t], traj.starts[t + 1]
            for i in done:
                ids[i], issued = str(issued), issued + 1
    return ReplicaRun(steps, R * steps, tokens, verified, batch_tokens, seconds, drafted_steps, draft_total)


# ------------------------------------------------------------------------------ grid
@dataclass(frozen=True)
class SimResult:
    policy: str  # PolicySpec.label
    replicas: int
    concurrency: int  # requests in flight over all replicas
    steps: int  # simulated steps per busy replica (max(steps, ⌈min_request_steps / concurrency⌉))
    goodput: float  # tokens/s over all replicas
    tau: float  # tokens per request per step
    mean_verify: float  # mean ℓ per request-step
    mean_batch: float  # mean verify-batch tokens B per replica step
    step_ms: float  # mean simulated step time (draft included)
    drafted: float = 1.0  # fraction of steps that ran a draft pass

    @property
    def per_request(self) -> float:  # tokens/s one request sees
        return self.goodput / self.concurrency


def simulate(
    traj: Trajectories,
    sps: Any,
    spec: PolicySpec,
    *,
    concurrency: int,
    replicas: int = 1,
    steps: int = 200,
    min_request_steps: int = 4000,
    seed: int = 0,
    policy_params: dict[str, Any] | None = None,
) -> SimResult:
    """One (policy, concurrency, replicas) point: every busy replica runs
    max(steps, ⌈min_request_steps / concurrency⌉) steps, so small concurrencies still replay
    enough request-steps to average over many recorded requests. Replica i draws from the RNG
    seeded with (seed, concurrency, replicas, i): the same for every policy."""
    if concurrency < 1 or replicas < 1 or steps < 1 or min_request_steps < 0:
        raise SimulationError("concurrency, replicas and steps must be >= 1 and min_request_steps >= 0")
    steps = max(steps, -(-min_request_steps // concurrency))
    curve = as_sps(sps)
    runs = []
    for i, load in enumerate(spread(concurrency, replicas)):
        if load == 0:
            continue  # more replicas than requests: this one idles
        rng = np.random.default_rng(np.random.SeedSequence([seed, concurrency, replicas, i]))
        runs.append(simulate_replica(traj, build_policy(spec, curve, policy_params), curve, load, steps, rng))
    req_steps = sum(r.request_steps for r in runs)
    return SimResult(
        policy=spec.label, replicas=replicas, concurrency=concurrency, steps=steps,
        goodput=sum(r.tokens / r.seconds for r in runs),
        tau=sum(r.tokens for r in runs) / req_steps,
        mean_verify=sum(r.verified for r in runs) / req_steps,
        mean_batch=sum(r.batch_tokens for r in runs) / sum(r.steps for r in runs),
        step_ms=1e3 * sum(r.seconds for r in runs) / sum(r.steps for r in runs),
        drafted=sum(r.drafted_steps for r in runs) / sum(r.steps for r in runs),
    )


def run_grid(
    traj: Trajectories,
    sps: Any,
    specs: Sequence[PolicySpec],
    *,
    concurrency: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    replicas: Sequence[int] = (1,),
    steps: int = 200,
    min_request_steps: int = 4000,
    seed: int = 0,
    progress: bool = False,
    policy_params: dict[str, Any] | None = None,
) -> list[SimResult]:
    """Every (replicas, concurrency, policy) point, in that nesting order."""
    points = [(n, c, s) for n in replicas for c in concurrency for s in specs]
    if progress:
        from tqdm.auto import tqdm

        points = tqdm(points, desc="simulate", unit="point")
    out = []
    for n, c, s in points:
        if progress:
            points.set_postfix_str(f"{s.label} @ {c} requests, {n} replicas")  # type: ignore[attr-defined]
        out.append(simulate(traj, sps, s, concurrency=c, replicas=n, steps=steps, min_request_steps=min_request_steps,
                            seed=seed, policy_params=policy_params))
    return out


# ------------------------------------------------------------------------------ report
def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.3f}"


def _baseline(policies: list[str]) -> str:
    return "off" if "off" in policies else policies[0]


def render_markdown(results: Sequence[SimResult]) -> str:
    """Goodput (tokens/s) per (replicas, concurrency) and policy with the best policy's gain over the
    baseline (``off`` when simulated); then τ and mean ℓ per policy for the smallest replica count."""
    from dspark.platform.bench.report import markdown_table

    policies = list(dict.fromkeys(r.policy for r in results))
    base = _baseline(policies)
    by = {(r.replicas, r.concurrency, r.policy): r for r in results}
    keys = list(dict.fromkeys((r.replicas, r.concurrency) for r in results))
    rows = []
    for n, c in keys:
        cells = [by.get((n, c, p)) for p in policies]
        best = max((r for r in cells if r is not None), key=lambda r: r.goodput)
        ref = by.get((n, c, base))
        gain = f"{best.policy} ({best.goodput / ref.goodput:.2f}× {base})" if ref else best.policy
        rows.append([n, c, *[_num(r.goodput) if r else "—" for r in cells], gain])
    goodput = markdown_table(["replicas", "concurrency", *[f"{p} tok/s" for p in policies], "best"], rows)
    n0 = min(n for n, _ in keys)
    rows = []
    for c in [c for n, c in keys if n == n0]:
        cells = [by.get((n0, c, p)) for p in policies]
        rows.append([c, *[f"{r.tau:.2f} / {r.mean_verify:.2f} / {r.mean_batch:,.0f} / {100 * r.drafted:.0f}%" if r else "—"
                          for r in cells]])
    detail = markdown_table(["concurrency", *[f"{p}: τ / ℓ̄ / B / drafted" for p in policies]], rows)
    note = (f"Per policy at {n0} replica{'s' if n0 > 1 else ''}: τ (tokens per request-step), mean ℓ, mean batch "
            f"tokens B per step and the share of steps that ran a draft pass.")
    return f"{goodput}\n\n{note}\n\n{detail}"


def plot(results: Sequence[SimResult], path: Any, title: str = "Simulated goodput") -> None:
    """One column per replica count: goodput vs concurrency (log-log) above, goodput relative to
    the baseline policy (``off`` when simulated) below; one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r.policy for r in results))
    base = _baseline(policies)
    reps = sorted({r.replicas for r in results})
    by = {(r.replicas, r.concurrency, r.policy): r for r in results}
    fig, axes = plt.subplots(2, len(reps), figsize=(3.6 * len(reps) + 1.2, 6.2), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    for j, n in enumerate(reps):
        top, bottom = axes[0, j], axes[1, j]
        for i, p in enumerate(policies):
            xs = sorted(c for (m, c, q) in by if m == n and q == p)
            ys = [by[(n, c, p)].goodput for c in xs]
            ref = [by[(n, c, base)].goodput if (n, c, base) in by else float("nan") for c in xs]
            style = dict(color=f"C{i % 10}", marker="os^vDx+*"[i % 8], ms=3.5, ls="-" if i < 8 else "--")
            top.plot(xs, ys, label=p, **style)
            bottom.plot(xs, [y / b for y, b in zip(ys, ref)], **style)
        top.set_xscale("log", base=2)
        top.set_yscale("log")
        top.set_title(f"{n} replica{'s' if n > 1 else ''}", fontsize=9)
        bottom.set_xlabel("concurrent requests")
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("goodput (tokens/s)")
    axes[1, 0].set_ylabel(f"× {base}")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
