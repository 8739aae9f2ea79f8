"""``dspark bench sampling``: what reproducible seeded sampling costs in speculation.

Seeded sampled requests are verified by matching against the target's token under position-keyed
noise (``platform/sampling.py``); unseeded ones by chain rejection sampling. The first makes a
request's tokens independent of verify lengths, batches and load, at the price of a somewhat lower
acceptance (the Gumbel coupling's ≥ (1 − δ)/(1 + δ) against rejection sampling's 1 − δ, for
total-variation distance δ between draft and target). This benchmark measures both on one drafter:
at each temperature, the same prompts run through the engine with a fixed verify length (γ, so τ
reflects acceptance, not a policy) once with a seed per request and once without; the seeded
outputs are checked token for token against plain decoding with the same seeds. It also times the
noise itself: E(key, n) for every verified row against drawing the same amount from generators.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dspark.platform.contracts import GenerationRequest, SamplingParams

__all__ = ["SamplingBenchRow", "noise_cost_line", "noise_cost_ms", "render_markdown", "run_sampling_bench",
           "section_body"]


@dataclass(frozen=True)
class SamplingBenchRow:
    temperature: float
    mode: str  # "seeded (matching)" or "unseeded (rejection)"
    tau: float  # tokens per request per verify step
    accept_at: tuple[float, ...]  # acceptance rate at block positions 1..γ
    tokens_per_s: float
    identical: int | None  # seeded: outputs equal to plain decoding with the same seed (None: not checked)
    requests: int


def _requests(prompts: Sequence[Sequence[int]], temperature: float, max_tokens: int, seeded: bool):
    return [GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                               seed=1000 + i if seeded else None, ignore_eos=True))
            for i, p in enumerate(prompts)]


def _run(target, drafter, reqs, batch_size: int, policy=None):
    from dspark.scheduler.policies import FixedPolicy
    from dspark.verifier_service.engine import VerifierEngine

    eng = VerifierEngine(target, drafter, policy or (FixedPolicy() if drafter is not None else None),
                         max_batch_size=batch_size)
    t0 = time.perf_counter()
    outs = eng.generate(reqs)
    return outs, time.perf_counter() - t0


def _row(temperature: float, mode: str, outs: dict, seconds: float, identical: int | None) -> SamplingBenchRow:
    stats = [o.stats for o in outs.values()]
    steps, accepted = sum(s.steps for s in stats), sum(s.accepted for s in stats)
    gamma = max(len(s.proposed_at) for s in stats)
    prop = [sum(s.proposed_at[k] for s in stats if k < len(s.proposed_at)) for k in range(gamma)]
    acc = [sum(s.accepted_at[k] for s in stats if k < len(s.accepted_at)) for k in range(gamma)]
    tokens = sum(len(o.token_ids) for o in outs.values())
    return SamplingBenchRow(temperature, mode, (accepted + steps) / max(steps, 1),
                            tuple(a / p if p else 0.0 for a, p in zip(acc, prop)), tokens / seconds, identical, len(outs))


def run_sampling_bench(target: Any, drafter: Any, prompts: Sequence[Sequence[int]], *, temperatures: Sequence[float],
                       max_tokens: int, batch_size: int, repeats: int = 3, progress=None) -> list[SamplingBenchRow]:
    """Per temperature: the seeded plain reference (also the warm-up), then ``repeats`` rounds of the
    seeded and the unseeded speculative run (fixed γ), their order alternating per round; the
    tokens/s figure is the median round. Outputs and τ repeat exactly from round to round."""
    rows = []
    for t in temperatures:
        reqs = {"seeded (matching)": _requests(prompts, t, max_tokens, True),
                "unseeded (rejection)": _requests(prompts, t, max_tokens, False)}
        plain, _ = _run(target, None, reqs["seeded (matching)"], batch_size)
        runs: dict[str, tuple[dict, list[float]]] = {}
        for i in range(repeats):
            for mode in (list(reqs) if i % 2 == 0 else list(reqs)[::-1]):
                outs, sec = _run(target, drafter, reqs[mode], batch_size)
                runs.setdefault(mode, (outs, []))[1].append(sec)
        for mode, (outs, secs) in runs.items():
            same = sum(outs[k].token_ids == plain[k].token_ids for k in plain) if mode.startswith("seeded") else None
            rows.append(_row(t, mode, outs, statistics.median(secs), same))
        if progress is not None:
            progress(1)
    return rows


def noise_cost_ms(rows: int, vocab: int, repeats: int = 5) -> tuple[float, float]:
    """(ms for E(key, n) of ``rows`` rows, ms for drawing as many Exp(1) rows from generators), medians."""
    from dspark.platform.sampling import draw_exponentials, keyed_exponentials

    gens = [torch.Generator().manual_seed(i) for i in range(rows)]

    def timed(fn) -> float:
        fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(out)

    return (timed(lambda: keyed_exponentials(list(range(rows)), [7] * rows, vocab)),
            timed(lambda: draw_exponentials(gens, vocab)))


def render_markdown(rows: Sequence[SamplingBenchRow]) -> str:
    from dspark.platform.bench.report import markdown_table

    base = {r.temperature: r for r in rows if r.mode.startswith("unseeded")}
    body = []
    for r in rows:
        ref = base.get(r.temperature)
        body.append([f"{r.temperature:g}", r.mode, f"{r.tau:.2f}",
                     f"{(r.tau - 1) / (ref.tau - 1):.2f}" if ref is not None and ref.tau > 1 else "–",
                     " ".join(f"{a:.2f}" for a in r.accept_at), f"{r.tokens_per_s:.1f}",
                     "–" if r.identical is None else f"{r.identical}/{r.requests}"])
    return markdown_table(["T", "requests", "τ", "accepted drafts vs unseeded", "acceptance at positions 1..γ",
                           "tokens/s", "equal to plain decoding with the seed"], body)


def noise_cost_line(rows: int, vocab: int) -> str:
    """One sentence: :func:`noise_cost_ms` for one full verify step of ``rows`` rows."""
    keyed_ms, drawn_ms = noise_cost_ms(rows, vocab)
    return (f"Noise for one full verify step (max_batch_size × (γ + 1) = {rows} rows × V = {vocab}): E(key, n) "
            f"{keyed_ms:.1f} ms, drawn from generators {drawn_ms:.1f} ms (median of 5, {torch.get_num_threads()} torch "
            f"threads).")


def section_body(drafter: str, requests: int, prompt_tokens: int, max_tokens: int, batch_size: int, repeats: int,
                 figures: str) -> str:
    """The BENCHMARKS.md section: the set-up in words, then ``figures`` (the table and the noise line)."""
    return (
        f"Drafter: {drafter}. {requests} prompts of {prompt_tokens} tokens from the test split, {max_tokens} new "
        f"tokens each, end-of-text ignored, max_batch_size {batch_size}, fixed verify length γ (so τ measures "
        f"acceptance, not a policy); tokens/s is the median of {repeats} rounds, seeded and unseeded alternating. "
        f"*Seeded* requests (one seed each) are verified by matching the target's token under position-keyed "
        f"noise, which makes them reproducible under any load and equal to plain decoding with the same seed "
        f"(checked, last column); *unseeded* ones by chain rejection sampling. \"accepted drafts vs unseeded\" = "
        f"(τ − 1) seeded ÷ (τ − 1) unseeded. tokens/s falls further than τ: a seeded step also computes E(key, n) "
        f"for every verified position (Σ(ℓ + 1) rows), where rejection sampling draws one noise row per request "
        f"(the per-row cost is timed below).\n\n{figures}\n"
    )
