"""A closed-loop load generator for an OpenAI-compatible endpoint, through the real ``openai``
client (streaming). Shared by ``dspark bench serve``, ``dspark demo`` and the reliability scripts.

``run_load`` keeps ``concurrency`` streams open until every request of the list has been sent
once; each stream records what a user sees:

* TTFT: request sent -> first chunk that carries text (a chunk of whitespace counts);
* chunk gaps: the times between successive text chunks. With speculative decoding one chunk can
  carry several tokens (an accepted block), so these are the *inter-token latencies a user sees*
  (ITL, as streaming benchmarks usually define it), and TPOT = (latency - TTFT) / (tokens - 1)
  is the mean time per output token;
* tokens: ``usage.completion_tokens`` from the final usage chunk (``stream_options.include_usage``),
  plus our ``usage.dspark`` acceptance statistics when the server sends them.

``summarize`` turns the records of one run into the figures of a benchmark row. Errors are
recorded per request (``error``), never raised: a load run measures failures too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["LoadRequest", "RequestRecord", "LoadSummary", "run_load", "run_load_sync", "run_load_for", "summarize",
           "text_prompts", "percentile"]


@dataclass(frozen=True)
class LoadRequest:
    """One request of a load run (a completion; ``chat=True`` sends it as one user message)."""

    prompt: str | list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = True
    chat: bool = False


@dataclass
class RequestRecord:
    index: int
    start: float = 0.0  # perf_counter seconds, relative to the run's start
    ttft: float | None = None
    end: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between successive text chunks
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    acceptance: dict | None = None  # usage.dspark, when the server sends it
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.ttft is None or self.end is None or self.tokens < 2:
            return None
        return (self.end - self.start - self.ttft) / (self.tokens - 1)


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class LoadSummary:
    requests: int
    failed: int
    seconds: float  # wall time of the run
    tokens: int  # completion tokens of the successful requests
    aggregate_tps: float  # tokens / seconds
    per_user_tps: float | None  # median over requests of tokens / (latency - TTFT) (the decode rate one user sees)
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    tpot_mean: float | None
    latency_p50: float | None
    latency_p99: float | None
    tokens_per_step: float | None  # mean of usage.dspark.tokens_per_step (speculative servers)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(records: Sequence[RequestRecord], seconds: float) -> LoadSummary:
    ok = [r for r in records if r.error is None and r.end is not None]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    lat = [r.latency for r in ok if r.latency is not None]
    user = [r.tokens / (r.latency - r.ttft) for r in ok
            if r.ttft is not None and r.latency is not None and r.latency > r.ttft and r.tokens > 1]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    tps = [r.acceptance["tokens_per_step"] for r in ok if r.acceptance and r.acceptance.get("tokens_per_step")]
    return LoadSummary(
        requests=len(records), failed=len(records) - len(ok), seconds=seconds, tokens=tokens,
        aggregate_tps=tokens / seconds if seconds > 0 else 0.0,
        per_user_tps=statistics.median(user) if user else None,
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99),
        tpot_mean=statistics.fmean(tpots) if tpots else None,
        latency_p50=percentile(lat, 50), latency_p99=percentile(lat, 99),
        tokens_per_step=statistics.fmean(tps) if tps else None,
    )


def text_prompts(n: int, *, min_chars: int = 80, max_chars: int = 320, seed: int = 0, split: str = "test") -> list[str]:
    """``n`` text prompts cut at line starts from the demo corpus's ``split`` (Python source of
    the standard library, deterministic given ``seed``); any tokenizer can take them."""
    import random

    from dspark.platform.demo.corpus import read_split

    rng = random.Random(seed)
    out: list[str] = []
    for f in read_split(split):  # type: ignore[arg-type]
        starts = [0] + [i + 1 for i, ch in enumerate(f.text) if ch == "\n" and i + 1 < len(f.text)]
        for start in sorted(rng.sample(starts, min(2, len(starts)))):
            piece = f.text[start : start + rng.randint(min_chars, max_chars)]
            if len(piece.strip()) >= min_chars // 2:
                out.append(piece)
                if len(out) == n:
                    return out
    if len(out) < n:
        raise ValueError(f"the {split} split gave only {len(out)} prompts, {n} wanted")
    return out


async def _one(client: Any, model: str, req: LoadRequest, rec: RequestRecord, t0: float, acceptance: bool) -> None:
    extra: dict[str, Any] = {"ignore_eos": req.ignore_eos}
    if acceptance:
        extra["dspark"] = {"acceptance": True}
    common = dict(model=model, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                  stop=list(req.stop) or None, stream=True, stream_options={"include_usage": True}, extra_body=extra)
    rec.start = time.perf_counter() - t0
    last = None
    try:
        if req.chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": req.prompt}], **common)
        else:
            stream = await client.completions.create(prompt=req.prompt, **common)
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices:
                c = chunk.choices[0]
                piece = (c.delta.content if req.chat else c.text) or ""
                if piece:
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.gaps.append(now - last)
                    last = now
                    rec.text += piece
                if c.finish_reason:
                    rec.finish_reason = c.finish_reason
            if getattr(chunk, "usage", None) is not None:
                rec.tokens = chunk.usage.completion_tokens
                extra_usage = getattr(chunk.usage, "model_extra", None) or {}
                rec.acceptance = extra_usage.get("dspark")
        rec.end = time.perf_counter() - t0
        if rec.ttft is None and rec.tokens:  # tokens that decode to no text (rare): first = last
            rec.ttft = rec.end - rec.start
    except Exception as exc:  # recorded, not raised: failures are a figure of the run
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_load(base_url: str, model: str, requests: Sequence[LoadRequest], *, concurrency: int,
                   api_key: str = "none", timeout_s: float = 300.0, acceptance: bool = True,
                   progress: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` with at most ``concurrency`` in flight -> (records in request order, wall seconds)."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s) as client:
        records = [RequestRecord(i) for i in range(len(requests))]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(requests)):
            queue.put_nowait(i)
        t0 = time.perf_counter()

        async def user() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _one(client, model, requests[i], records[i], t0, acceptance)
                if progress is not None:
                    progress(records[i])

        await asyncio.gather(*(user() for _ in range(max(1, min(concurrency, len(requests))))))
        return records, time.perf_counter() - t0


def run_load_sync(*args: Any, **kwargs: Any) -> tuple[list[RequestRecord], float]:
    """:func:`run_load` from synchronous code (its own event loop)."""
    return asyncio.run(run_load(*args, **kwargs))


async def run_load_for(base_url: str, model: str, make_request: Callable[[int], LoadRequest], *, concurrency: int,
                       duration_s: float, api_key: str = "none", timeout_s: float = 300.0, acceptance: bool = True,
                       progress: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """A closed loop for a fixed time: ``concurrency`` streams each send ``make_request(i)`` (``i``
    counts the requests sent so far) one after another until ``duration_s`` has passed; requests
    in flight then finish (each bounded by ``timeout_s``). -> (records in sending order, wall seconds)."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s) as client:
        records: list[RequestRecord] = []
        t0 = time.perf_counter()

        async def user() -> None:
            while time.perf_counter() - t0 < duration_s:
                rec = RequestRecord(len(records))
                records.append(rec)
                await _one(client, model, make_request(rec.index), rec, t0, acceptance)
                if progress is not None:
                    progress(rec)

        await asyncio.gather(*(user() for _ in range(max(1, concurrency))))
        return records, time.perf_counter() - t0
