"""``dspark bench engine``: plain decoding vs speculative decoding in the verifier engine (no Ray).

For each batch size B, B prompts cut from the demo corpus's *test* split (never trained on) run
to exactly ``max_tokens`` new tokens each (greedy, end-of-text ignored, so every configuration
decodes the same number of tokens), first with plain decoding (the same engine with ℓ = 0), then
with each drafter. Every configuration gets a warm-up run first and the figure is the median of
``repeats`` timed runs. Per drafter and batch size it reports tokens/s, the speed-up over plain
decoding measured in the same run, τ (tokens per verify step) and what one step costs: draft ms
and verify ms (target forward + acceptance + commit). ``transformers``' own ``generate`` at the same
batch is timed too, so plain decoding is shown to be a fair baseline.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.config import EngineConfig

__all__ = ["EngineBenchRow", "benchmark_prompts", "run_engine_bench", "render_markdown", "plot"]


@dataclass(frozen=True)
class EngineBenchRow:
    drafter: str  # "plain" for plain decoding
    batch_size: int
    tokens: int  # generated tokens per timed run (batch × max_tokens)
    seconds: float  # median wall time of the timed runs
    tau: float  # tokens emitted per verify step (1.0 for plain decoding)
    draft_ms: float  # per verify step
    verify_ms: float  # per verify step
    prefill_ms: float  # per timed run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def benchmark_prompts(tokenizer: Any, n: int, prompt_tokens: int, fractions=(0.9, 0.05, 0.05)) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_tokens`` tokens: the openings of the first test-split files
    long enough (sorted by path, so the set is fixed for a given Python)."""
    from dspark.platform.demo.corpus import read_split

    out: list[list[int]] = []
    for f in read_split("test", fractions):
        ids = tokenizer(f.text[: 32 * prompt_tokens]).input_ids  # a prefix is enough
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
            if len(out) == n:
                return out
    if not out:
        raise RuntimeError(f"no test-split file has {prompt_tokens} tokens")
    return [out[i % len(out)] for i in range(n)]  # fewer long files than prompts: reuse them


def _timed_run(target, drafter, prompts: list[list[int]], max_tokens: int, engine_cfg: EngineConfig):
    from dspark.verifier_service.engine import VerifierEngine

    if drafter is not None:
        from dspark.scheduler.policies import FixedPolicy

        policy = FixedPolicy()
    else:
        policy = None
    eng = VerifierEngine(
        target, drafter, policy, max_batch_size=max(len(prompts), 1),
        max_model_len=max(len(p) for p in prompts) + max_tokens + 1, prefill_chunk=engine_cfg.prefill_chunk,
        seed=engine_cfg.seed,
    )
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)]
    t0 = eng._now()
    outs = eng.generate(reqs)
    seconds = eng._now() - t0
    steps = sum(o.stats.steps for o in outs.values())
    emitted = sum(o.stats.accepted + o.stats.steps for o in outs.values())
    tokens = sum(len(o.token_ids) for o in outs.values())
    assert tokens == len(prompts) * max_tokens, "every request must decode exactly max_tokens"
    draft_ms, verify_ms = eng.timings.per_step_ms()
    return seconds, tokens, (emitted / steps if steps else 1.0), draft_ms, verify_ms, 1e3 * eng.timings.prefill_s, outs


def _hf_generate_run(target, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds for ``transformers`` ``generate`` (greedy, static batch: the prompts have equal
    lengths, so no padding) — the reference point for our plain decoding."""
    import time

    ids = torch.tensor(prompts, device=target.device)
    t0 = time.perf_counter()
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    assert out.shape[1] == ids.shape[1] + max_tokens
    return time.perf_counter() - t0


def run_engine_bench(
    target: Any,
    drafters: dict[str, Callable[[], Any]],  # name -> factory of a fresh drafter
    *,
    batch_sizes: Sequence[int] = (1, 4, 16),
    max_tokens: int = 64,
    prompt_tokens: int = 64,
    repeats: int = 3,
    engine_cfg: EngineConfig | None = None,
    progress: bool = True,
) -> list[EngineBenchRow]:
    from tqdm.auto import tqdm

    engine_cfg = engine_cfg or EngineConfig()
    prompts_all = benchmark_prompts(target.tokenizer, max(batch_sizes), prompt_tokens)
    configs = [(name, b) for b in batch_sizes for name in ("transformers generate", "plain", *drafters)]
    rows: list[EngineBenchRow] = []
    plain_outputs: dict[int, dict] = {}  # batch -> outputs of plain decoding
    bar = tqdm(configs, desc="bench engine", unit="config", disable=not progress)
    for name, b in bar:
        bar.set_postfix_str(f"{name} @ batch {b}")
        if name == "transformers generate":
            _hf_generate_run(target, prompts_all[:b], 4)  # warm-up
            secs = sorted(_hf_generate_run(target, prompts_all[:b], max_tokens) for _ in range(repeats))
            rows.append(EngineBenchRow(name, b, b * max_tokens, secs[len(secs) // 2], 1.0, 0.0, 0.0, 0.0))
            continue
        drafter = drafters[name]() if name != "plain" else None
        prompts = prompts_all[:b]
        _timed_run(target, drafter, prompts[:1], 8, engine_cfg)  # warm-up (allocations, kernels)
        runs = sorted((_timed_run(target, drafter, prompts, max_tokens, engine_cfg) for _ in range(repeats)), key=lambda r: r[0])
        seconds, tokens, tau, draft_ms, verify_ms, prefill_ms, outs = runs[len(runs) // 2]  # the median run
        if name == "plain":
            plain_outputs[b] = outs
        else:  # lossless: greedy speculative output must equal plain greedy output
            _check_identical(name, b, outs, plain_outputs[b])
        rows.append(EngineBenchRow(name, b, tokens, seconds, tau, draft_ms, verify_ms, prefill_ms))
    return rows


def _check_identical(name: str, batch: int, outs: dict, plain_outs: dict) -> None:
    for rid, o in outs.items():
        if o.token_ids != plain_outs[rid].token_ids:
            raise AssertionError(f"{name}: output of {rid} differs from plain decoding at batch {batch}")


def render_markdown(rows: list[EngineBenchRow]) -> str:
    """One table: a row per (batch, drafter) with the speed-up against plain decoding at that batch."""
    from dspark.platform.bench.report import markdown_table

    plain = {r.batch_size: r for r in rows if r.drafter == "plain"}  # ratios are against our plain decoding
    table = []
    for r in rows:
        base = plain.get(r.batch_size)
        speedup = f"{r.tokens_per_s / base.tokens_per_s:.2f}×" if base else "—"
        table.append([
            r.batch_size, r.drafter, f"{r.tokens_per_s:.1f}", speedup, f"{r.tau:.2f}",
            f"{r.draft_ms:.2f}" if r.drafter not in ("plain", "transformers generate") else "—",
            f"{r.verify_ms:.2f}" if r.drafter != "transformers generate" else "—",
            f"{r.prefill_ms:.0f}" if r.drafter != "transformers generate" else "—",
        ])
    return markdown_table(
        ["batch", "drafter", "tokens/s", "vs plain", "τ", "draft ms/step", "verify ms/step", "prefill ms"], table
    )


def plot(rows: list[EngineBenchRow], path) -> None:
    """Grouped bars: tokens/s per batch size, one bar per drafter (plain first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.drafter for r in rows))
    batches = sorted({r.batch_size for r in rows})
    by = {(r.drafter, r.batch_size): r for r in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(batches))]
        ax.bar(xs, [by[(n, b)].tokens_per_s if (n, b) in by else 0 for b in batches], width, label=n)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens/s")
    ax.set_title("Verifier engine: plain vs speculative decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
