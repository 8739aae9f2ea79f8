"""A bounded soak: many streaming clients for a fixed time against a locally started app, with
the memory (RSS) of every Ray process of the application sampled throughout.

``run_soak`` sends requests from ``clients`` closed-loop streams (``dspark.platform.bench.load``)
until ``duration_s`` has passed, then lets the requests in flight finish (each bounded by the
client timeout), so it always stops by itself. Meanwhile :class:`MemorySampler` reads, every
``interval_s``, the RSS of the driver (this process: the load generator, and the Serve handle
owner) and of every ``ray::`` actor process below it (Serve controller, HTTP proxy, replicas of
every deployment, the scheduler actor), found by walking this process's children, so other Ray
instances on the machine are never counted. A process that restarts (a new pid under the same
title) is a new series. Growth is measured between the sample nearest the end of the warm-up
(``warmup`` x duration) and the last sample.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dspark.platform.bench.load import LoadRequest, LoadSummary, RequestRecord, run_load_for, summarize

__all__ = ["MemorySampler", "Series", "SoakResult", "soak_requests", "run_soak", "render_markdown", "plot"]

MiB = 2**20


@dataclass
class Series:
    """RSS samples of one process: (seconds since the start, bytes)."""

    label: str
    pid: int
    points: list[tuple[float, int]] = field(default_factory=list)

    def at(self, t: float) -> int | None:
        """The sample nearest ``t`` (None without samples)."""
        return min(self.points, key=lambda p: abs(p[0] - t))[1] if self.points else None


def _title(proc: Any) -> str | None:
    """``ServeReplica:app:VerifierReplica`` for a ``ray::`` actor process, None for anything else
    (idle workers, Ray's own agents)."""
    try:
        cmd = proc.cmdline()
    except Exception:
        return None
    if not cmd or not cmd[0].startswith("ray::"):
        return None
    title = cmd[0][5:].split(" ", 1)[0]
    if title.startswith(("IDLE", "DashboardAgent", "RuntimeEnvAgent")):
        return None
    return title.split(".", 1)[0]  # "Class.method" while a call runs


class MemorySampler:
    """Samples the RSS of this process and its ``ray::`` actor descendants on a daemon thread."""

    def __init__(self, interval_s: float = 5.0, *, root_pid: int | None = None):
        self.interval_s = interval_s
        self.root_pid = root_pid or os.getpid()
        self.series: dict[tuple[str, int], Series] = {}
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-memory", daemon=True)

    def start(self) -> "MemorySampler":
        self._t0 = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        import psutil

        root = psutil.Process(self.root_pid)
        now = time.monotonic() - self._t0
        procs = [("driver", root)]
        for p in root.children(recursive=True):
            title = _title(p)
            if title is not None:
                procs.append((title, p))
        for title, p in procs:
            try:
                rss = p.memory_info().rss
            except Exception:  # exited between the listing and the read
                continue
            key = (title, p.pid)
            if key not in self.series:
                self.series[key] = Series(self._label(title, p.pid), p.pid)
            self.series[key].points.append((now, rss))

    def _label(self, title: str, pid: int) -> str:
        parts = title.split(":")
        name = parts[-1] if parts[0] == "ServeReplica" else parts[0]  # the deployment, or the actor class
        same = [s for (t, _), s in self.series.items() if t == title]
        return f"{name} (pid {pid})" + (f", restart {len(same)}" if same else "")

    def total(self) -> int:
        return sum(s.points[-1][1] for s in self.series.values() if s.points)


def soak_requests(tokenizer: Any, *, max_model_len: int, n_prompts: int = 256,
                  seed: int = 0) -> Callable[[int], LoadRequest]:
    """Request ``i`` of the soak: the lossless check's greedy mix (prompt lengths, max_tokens,
    stop strings, end-of-text handling, chat), one in four sampled at temperature 0.8."""
    from dspark.platform.reliability.lossless import build_cases

    cases = build_cases(tokenizer, n_prompts, max_model_len=max_model_len, seed=seed, repeats=1)

    def make(i: int) -> LoadRequest:
        c = cases[i % len(cases)].request
        rng = random.Random(seed * 1_000_003 + i)
        if rng.random() < 0.25:
            return LoadRequest(c.prompt, max(c.max_tokens, 8), temperature=0.8, seed=i, stop=c.stop,
                               ignore_eos=c.ignore_eos, chat=c.chat)
        return c

    return make


@dataclass
class SoakResult:
    duration_s: float  # the load's wall time (sending stops at duration; in-flight requests finish)
    clients: int
    load: LoadSummary
    errors: list[str]  # the first few failures' messages
    series: list[Series]
    warm_t: float  # seconds: where growth is measured from


def run_soak(endpoint: Any, make_request: Callable[[int], LoadRequest], *, duration_s: float, clients: int,
             interval_s: float = 5.0, warmup: float = 0.2, timeout_s: float = 300.0) -> SoakResult:
    """The load and the sampling (see the module docstring), with a progress bar per second."""
    from tqdm.auto import tqdm

    sampler = MemorySampler(interval_s).start()
    done: list[RequestRecord] = []

    async def main():
        async def ticker():
            with tqdm(total=int(duration_s), desc=f"soak ({clients} clients)", unit="s") as bar:
                t0 = time.monotonic()
                while not task.done():
                    await asyncio.sleep(1.0)
                    bar.n = min(int(duration_s), int(time.monotonic() - t0))
                    failed = sum(r.error is not None for r in done)
                    bar.set_postfix_str(f"served {len(done) - failed}, failed {failed}, "
                                        f"RSS {sampler.total() / MiB:,.0f} MiB")
                    bar.refresh()

        task = asyncio.ensure_future(run_load_for(endpoint.url, endpoint.model, make_request, concurrency=clients,
                                                  duration_s=duration_s, api_key=endpoint.api_key,
                                                  timeout_s=timeout_s, progress=done.append))
        await asyncio.gather(task, ticker())
        return task.result()

    try:
        records, seconds = asyncio.run(main())
    finally:
        sampler.stop()
    errors = [r.error for r in records if r.error is not None]
    return SoakResult(seconds, clients, summarize(records, seconds), errors[:5],
                      sorted(sampler.series.values(), key=lambda s: s.label), warmup * duration_s)


def _growth(s: Series, warm_t: float) -> tuple[float, float, float, float] | None:
    """(RSS at warm-up MiB, at the end MiB, growth MiB, growth %) of a series that covers both."""
    if not s.points or s.points[0][0] > warm_t + 1e-9 or len(s.points) < 2:
        return None
    a, b = s.at(warm_t) / MiB, s.points[-1][1] / MiB
    return a, b, b - a, 100.0 * (b - a) / a if a else 0.0


def render_markdown(r: SoakResult, *, what: str, plot_rel: str | None) -> str:
    from dspark.platform.bench.report import markdown_table

    s = r.load
    ms = lambda x: "–" if x is None else f"{1e3 * x:,.0f}"  # noqa: E731
    rows = [["requests sent", s.requests], ["served", s.requests - s.failed], ["**failed**", f"**{s.failed}**"],
            ["requests/s", f"{(s.requests - s.failed) / r.duration_s:.2f}"],
            ["completion tokens/s (aggregate)", f"{s.aggregate_tps:.0f}"],
            ["latency p50 / p99 (ms)", f"{ms(s.latency_p50)} / {ms(s.latency_p99)}"],
            ["TTFT p50 / p99 (ms)", f"{ms(s.ttft_p50)} / {ms(s.ttft_p99)}"]]
    mem = []
    tot_a = tot_b = 0.0
    for ser in r.series:
        g = _growth(ser, r.warm_t)
        if g is None:
            last = f"{ser.points[-1][1] / MiB:,.0f}" if ser.points else "–"
            mem.append([ser.label, "–", last, "started later", ""])
            continue
        tot_a, tot_b = tot_a + g[0], tot_b + g[1]
        mem.append([ser.label, f"{g[0]:,.0f}", f"{g[1]:,.0f}", f"{g[2]:+,.1f}", f"{g[3]:+.1f}%"])
    if tot_a:
        mem.append(["**all**", f"{tot_a:,.0f}", f"{tot_b:,.0f}", f"{tot_b - tot_a:+,.1f}",
                    f"{100 * (tot_b - tot_a) / tot_a:+.1f}%"])
    out = [f"{what}. {r.clients} concurrent streaming clients (closed loop, `openai` client) for "
           f"{r.duration_s:.0f} s (sending stops at the set duration; requests in flight finish): the lossless "
           "check's request mix (prompt lengths, max_tokens 1–128, stop strings, end-of-text on or off, one in ten "
           "a chat request), one in four sampled at temperature 0.8. Latency = request sent -> last chunk.", "",
           markdown_table(["", "value"], rows), "",
           f"Resident memory (RSS, MiB) of every process of the application, sampled every few seconds: at the end "
           f"of the warm-up ({r.warm_t:.0f} s) and at the end.", "",
           markdown_table(["process", "RSS after warm-up", "RSS at the end", "growth MiB", "growth"], mem), ""]
    if r.errors:
        out += ["First failures: " + "; ".join(f"`{e[:160]}`" for e in r.errors), ""]
    if plot_rel:
        out += [f"![soak memory]({plot_rel})", ""]
    return "\n".join(out)


def plot(r: SoakResult, path: Any) -> None:
    """RSS over time, one line per process, the end of the warm-up marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, s in enumerate(r.series):
        if s.points:
            ax.plot([p[0] for p in s.points], [p[1] / MiB for p in s.points], label=s.label, color=f"C{i % 10}",
                    ls="-" if i < 10 else "--")
    ax.axvline(r.warm_t, color="k", ls=":", lw=1, label="end of warm-up")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"Soak: RSS per process, {r.clients} clients, {r.duration_s:.0f} s", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
