"""``dspark bench policies``: verify-length policies on the real verifier engine (no Ray).

For each concurrency C, C prompts cut from the demo corpus's *test* split run to exactly
``max_tokens`` new tokens each (greedy, end-of-text ignored) through a fresh engine with
``max_batch_size = C``, once per policy:

* ``off``: plain decoding (the engine without a drafter: no drafting, no feature hand-off);
* ``fixed L``: verify the first L drafts of every request (by default L = 2, 4 and the drafter's γ);
* ``prefix``: Algorithm 1 (greedy by prefix survival maximising τ·SPS(B), with the early break);
* ``async``: capacity from confidences two steps old, filled by current survival.

``prefix`` and ``async`` plan with an SPS profile measured on this engine at start-up
(:func:`measure_profile`: real verify forwards of every batch token count up to C_max·(γ + 1), and
the draft pass for 1..C_max requests); they skip the draft pass on steps where it would not pay.
Each configuration gets a warm-up run; the timed runs go round-robin over the policies of one C
(so slow drift of the machine hits every policy alike) and each figure is the median of
``repeats``. Every speculative run's output is checked identical to plain decoding.

Per (C, policy) a row holds tokens/s, τ (tokens emitted per request per verify step), the mean
verify length ℓ (drafts verified per request per step) and what one batch step costs. Per C,
:func:`goal_checks` says whether the better of ``prefix``/``async`` reaches every fixed length
and plain decoding, the goal of a scheduled policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from dspark.platform.config import EngineConfig

__all__ = [
    "PolicyBenchRow",
    "GoalCheck",
    "SCHEDULED",
    "fixed_lengths",
    "policy_labels",
    "profile_token_counts",
    "measure_profile",
    "run_policy_bench",
    "goal_checks",
    "render_markdown",
    "plot",
]

SCHEDULED = ("prefix", "async")  # the policies that plan with the SPS profile


@dataclass(frozen=True)
class PolicyBenchRow:
    policy: str  # "off", "fixed L", "prefix", "async"
    concurrency: int
    tokens: int  # generated tokens per timed run (C × max_tokens)
    seconds: float  # median wall time of the timed runs (prefill included)
    tau: float  # tokens emitted per request per verify step (1.0 for plain decoding)
    mean_length: float  # drafts verified per request per verify step (ℓ̄)
    step_ms: float  # one batch verify step: draft + verify (target forward + acceptance + commit)
    draft_ms: float  # the drafting part of step_ms
    fallback_steps: int  # steps the drafter failed and the engine decoded plainly (should be 0)
    drafted: float = 1.0  # share of verify steps that ran a draft pass (the rest: the policy skipped it)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class GoalCheck:
    """At one concurrency: the best scheduled policy against the best of plain decoding and the
    fixed lengths. ``holds`` is the plain comparison of the measured medians (no noise margin)."""

    concurrency: int
    scheduled: PolicyBenchRow  # the faster of prefix / async
    other: PolicyBenchRow  # the fastest of off and every fixed length

    @property
    def ratio(self) -> float:
        return self.scheduled.tokens_per_s / self.other.tokens_per_s

    @property
    def holds(self) -> bool:
        return self.scheduled.tokens_per_s >= self.other.tokens_per_s


# ------------------------------------------------------------------------------ pure helpers
def fixed_lengths(gamma: int, requested: Sequence[int] | None = None) -> list[int]:
    """The fixed verify lengths to run: ``requested`` as given (each must be 1..γ), or by default
    2, 4 and γ, those not above γ, without repeats. Example: γ = 3 -> [2, 3]; γ = 7 -> [2, 4, 7]."""
    if requested is None:
        return sorted({n for n in (2, 4, gamma) if 1 <= n <= gamma})
    bad = [n for n in requested if not 1 <= n <= gamma]
    if bad:
        raise ValueError(f"fixed verify lengths must be in 1..{gamma} (the drafter's γ), got {bad}")
    return list(dict.fromkeys(int(n) for n in requested))


def policy_labels(lengths: Sequence[int]) -> list[str]:
    """Row labels in table order: off, the fixed lengths, then the scheduled policies."""
    return ["off", *[f"fixed {n}" for n in lengths], *SCHEDULED]


def profile_token_counts(width: int, max_concurrency: int) -> list[int]:
    """Batch token counts the SPS profile is measured at: every count up to one full row
    (1..``width``, width = γ + 1), then whole rows R·width for R up to ``max_concurrency``; so the
    profile covers 1..C_max·(γ + 1). Example: (3, 2) -> [1, 2, 3, 6]."""
    return sorted({*range(1, width + 1), *(r * width for r in range(1, max_concurrency + 1))})


def _make_policy(label: str, sps: Any):
    """A fresh policy object for a row label (policies may keep per-step state: one per engine);
    None for ``off``, which runs without a drafter."""
    from dspark.scheduler.registry import build_policy

    if label == "off":
        return None
    if label.startswith("fixed "):
        return build_policy("fixed", length=int(label.split()[1]))
    return build_policy(label, sps=sps)


# ------------------------------------------------------------------------------ measuring
def _engine(target, drafter, policy, concurrency: int, prompt_tokens: int, max_tokens: int, engine_cfg: EngineConfig):
    from dspark.verifier_service.engine import VerifierEngine

    return VerifierEngine(target, drafter, policy, max_batch_size=concurrency,
                          max_model_len=prompt_tokens + max_tokens + 1, prefill_chunk=engine_cfg.prefill_chunk,
                          seed=engine_cfg.seed)


def measure_profile(target: Any, drafter: Any, *, max_concurrency: int, prompt_tokens: int, max_tokens: int,
                    engine_cfg: EngineConfig | None = None, repeats: int = 5):
    """The SPS profile the scheduled policies plan with, measured on an engine built as the runs
    build theirs (this target and drafter, ``max_batch_size = max_concurrency``) over
    :func:`profile_token_counts`, with a committed context of the prompt plus half the new tokens
    (a mid-decode step). Returns a ``dspark.scheduler.sps.SPSProfile`` carrying the engine's identity."""
    from dspark.scheduler.policies import FixedPolicy
    from dspark.verifier_service.profiling import measure_sps

    engine_cfg = engine_cfg or EngineConfig()
    eng = _engine(target, drafter, FixedPolicy(), max_concurrency, prompt_tokens, max_tokens, engine_cfg)
    width = eng.gamma + 1
    context = min(prompt_tokens + max_tokens // 2, eng.cache.capacity - width)
    counts = profile_token_counts(width, max_concurrency)
    # a throwaway pass first: the first forwards of a fresh process are slow (allocations, kernel
    # selection) and would otherwise land on B = 1, the plain-decoding point
    measure_sps(eng, [counts[0], counts[-1]], repeats=1, warmup=2, width=width, context=context)
    return measure_sps(eng, counts, repeats=repeats, width=width, context=context)


@dataclass(frozen=True)
class _Run:
    seconds: float
    row: PolicyBenchRow
    outputs: dict  # request id -> RequestOutput


def _run_once(target, drafter, label: str, sps, prompts: list[list[int]], max_tokens: int,
              prompt_tokens: int, engine_cfg: EngineConfig) -> _Run:
    """One run of ``prompts`` through a fresh engine (``max_batch_size = len(prompts)``)."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams

    C = len(prompts)
    policy = _make_policy(label, sps)
    eng = _engine(target, drafter if policy is not None else None, policy, C, prompt_tokens, max_tokens, engine_cfg)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)]
    t0 = eng._now()
    outs = eng.generate(reqs)
    seconds = eng._now() - t0
    stats = [o.stats for o in outs.values()]
    steps = sum(s.steps for s in stats)  # request-steps
    tokens = sum(len(o.token_ids) for o in outs.values())
    assert tokens == C * max_tokens, "every request must decode exactly max_tokens"
    draft_ms, verify_ms = eng.timings.per_step_ms()
    row = PolicyBenchRow(
        policy=label, concurrency=C, tokens=tokens, seconds=seconds,
        tau=sum(s.accepted + s.steps for s in stats) / steps if steps else 1.0,
        mean_length=sum(s.drafted for s in stats) / steps if steps else 0.0,
        step_ms=draft_ms + verify_ms, draft_ms=draft_ms, fallback_steps=eng.total_fallback_steps,
        drafted=0.0 if eng.drafter is None else 1.0 - eng.skipped_draft_steps / max(1, eng.timings.steps),
    )
    return _Run(seconds, row, outs)


def run_policy_bench(
    target: Any,
    drafter: Any,
    sps: Any,  # the measured SPSProfile (measure_profile)
    *,
    concurrency: Sequence[int] = (1, 4, 16, 32),
    fixed: Sequence[int] | None = None,  # fixed verify lengths; None = 2, 4 and γ
    max_tokens: int = 64,
    prompt_tokens: int = 64,
    repeats: int = 3,
    engine_cfg: EngineConfig | None = None,
    progress: bool = True,
) -> list[PolicyBenchRow]:
    """Rows in the order (concurrency, policy) of ``concurrency`` × :func:`policy_labels`."""
    from tqdm.auto import tqdm

    from dspark.platform.bench.engine import _check_identical, benchmark_prompts

    engine_cfg = engine_cfg or EngineConfig()
    labels = policy_labels(fixed_lengths(int(drafter.block_size), fixed))
    prompts_all = benchmark_prompts(target.tokenizer, max(concurrency), prompt_tokens)
    rows: list[PolicyBenchRow] = []
    bar = tqdm(total=len(concurrency) * len(labels) * (repeats + 1), desc="bench policies", unit="run",
               disable=not progress)

    def run(label: str, prompts: list[list[int]], n: int) -> _Run:
        bar.set_postfix_str(f"{label} @ {len(prompts)} requests")
        out = _run_once(target, drafter, label, sps, prompts, n, prompt_tokens, engine_cfg)
        bar.update()
        return out

    for c in concurrency:
        prompts = prompts_all[:c]
        for label in labels:  # warm-up at the full batch (allocations, kernels, batch shapes)
            run(label, prompts, min(max_tokens, 8))
        runs: dict[str, list[_Run]] = {label: [] for label in labels}
        for _ in range(repeats):  # round-robin: off first, so each speculative run has its reference
            for label in labels:
                r = run(label, prompts, max_tokens)
                if label != "off":  # lossless: greedy speculative output must equal plain greedy output
                    _check_identical(label, c, r.outputs, runs["off"][0].outputs)
                runs[label].append(r)
        for label in labels:
            ordered = sorted(runs[label], key=lambda r: r.seconds)
            rows.append(ordered[len(ordered) // 2].row)  # the median run
    bar.close()
    return rows


# ------------------------------------------------------------------------------ reporting
def goal_checks(rows: Sequence[PolicyBenchRow]) -> list[GoalCheck]:
    """Per concurrency that has a scheduled row and an off/fixed row: best scheduled vs best other."""
    out = []
    for c in dict.fromkeys(r.concurrency for r in rows):
        at = [r for r in rows if r.concurrency == c]
        sched = [r for r in at if r.policy in SCHEDULED]
        other = [r for r in at if r.policy not in SCHEDULED]
        if sched and other:
            out.append(GoalCheck(c, max(sched, key=lambda r: r.tokens_per_s), max(other, key=lambda r: r.tokens_per_s)))
    return out


def render_markdown(rows: Sequence[PolicyBenchRow]) -> str:
    """The per-(C, policy) table, then one line per C: does the best scheduled policy reach every
    fixed length and plain decoding?"""
    from dspark.platform.bench.report import markdown_table

    off = {r.concurrency: r for r in rows if r.policy == "off"}
    table = []
    for r in rows:
        base = off.get(r.concurrency)
        table.append([
            r.concurrency, r.policy, f"{r.tokens_per_s:.1f}",
            f"{r.tokens_per_s / base.tokens_per_s:.2f}×" if base else "—",
            f"{r.tau:.2f}", f"{r.mean_length:.2f}", f"{r.step_ms:.2f}",
            f"{r.draft_ms:.2f}" if r.policy != "off" else "—",
            f"{100 * r.drafted:.0f}%",
        ])
    out = markdown_table(["C", "policy", "tokens/s", "vs off", "τ", "mean ℓ", "step ms", "of which draft ms", "drafted"], table)
    checks = goal_checks(rows)
    if checks:
        lines = [
            f"- C = {g.concurrency}: best scheduled **{g.scheduled.policy}** {g.scheduled.tokens_per_s:.1f} tokens/s vs "
            f"best of off/fixed **{g.other.policy}** {g.other.tokens_per_s:.1f} ({g.ratio:.2f}×): "
            + ("scheduled ≥ every fixed length and off" if g.holds else "**below** " + g.other.policy)
            for g in checks
        ]
        met = sum(g.holds for g in checks)
        out += (f"\n\nGoal (best of prefix/async ≥ every fixed length and ≥ off, by the medians): met at "
                f"{met} of {len(checks)} concurrencies.\n\n" + "\n".join(lines))
    failed = [r for r in rows if r.fallback_steps]
    if failed:
        out += "\n\nDrafter failures (those steps decoded plainly): " + ", ".join(
            f"{r.policy} @ C = {r.concurrency}: {r.fallback_steps} steps" for r in failed)
    return out


def plot(rows: Sequence[PolicyBenchRow], path: Any, title: str = "Verify-length policies on the verifier engine") -> None:
    """Tokens/s against concurrency (log2 x), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.policy for r in rows))
    conc = sorted({r.concurrency for r in rows})
    by = {(r.policy, r.concurrency): r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, p in enumerate(labels):
        xs = [c for c in conc if (p, c) in by]
        style = dict(color="k", ls="--") if p == "off" else dict(color=f"C{i % 10}", lw=2.2 if p in SCHEDULED else 1.2)
        ax.plot(xs, [by[(p, c)].tokens_per_s for c in xs], marker="os^vDx+*"[i % 8], ms=4, label=p, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrent requests (C)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
