"""``dspark bench serve``: the served endpoint under a concurrency sweep, through the real
``openai`` client (:mod:`dspark.platform.bench.load`).

Endpoints are labelled OpenAI base URLs (``LABEL=http://host:port/prefix/v1``). Either they are
given (``--url``, any deployment, e.g. a cluster), or :func:`launch_local` starts one Serve
config's application on a local Ray instance three times, under three route prefixes:

* ``disaggregated``: the config as given, draft workers as their own deployment;
* ``colocated``: the same with the drafter inside the verifier replica;
* ``plain``: no drafter (plain decoding, the baseline).

For each concurrency C every endpoint gets the same ``max(2C, min_requests)`` greedy requests
(text prompts from the demo corpus's test split, end-of-text ignored, so every request decodes
exactly ``max_tokens``), the endpoints taking turns within one C so that machine drift hits them
alike. Per (endpoint, C) a row holds aggregate and per-user tokens/s, TTFT and inter-token latency
percentiles, and, from the replica's step counters (``GET <base>/dspark/stats`` before and after),
what a verify step costs, what a draft call costs and the bytes one draft call moves between
the verifier and a draft worker. Greedy outputs of every speculative endpoint are compared with
the plain endpoint's request by request: a lossless server has 0 mismatches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from dspark.platform.bench.load import LoadRequest, LoadSummary, run_load_sync, summarize, text_prompts

__all__ = ["Endpoint", "ServeBenchRow", "launch_local", "run_serve_bench", "render_markdown", "plot", "VARIANTS"]

VARIANTS = ("disaggregated", "colocated", "plain")


@dataclass(frozen=True)
class Endpoint:
    label: str
    url: str  # OpenAI base URL, ending in /v1
    model: str
    api_key: str = "none"

    @property
    def stats_url(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1") + "/dspark/stats"


@dataclass(frozen=True)
class ServeBenchRow:
    label: str
    concurrency: int
    load: LoadSummary
    step_ms: float | None  # (draft + verify) seconds per verify step of the replica, ms
    draft_ms: float | None  # draft seconds per drafting step, ms (a draft RPC when disaggregated)
    drafted: float | None  # share of verify steps that ran a draft pass
    sent_bytes: float | None  # per draft call, verifier -> draft worker (disaggregated only)
    received_bytes: float | None  # per draft call, draft worker -> verifier
    fallback_steps: int | None  # steps that decoded plainly because the drafter failed
    mismatches: int | None  # greedy outputs that differ from the plain endpoint's (None: no plain run)
    first_error: str | None = None  # the first failed request's error, if any


def _get_json(url: str, api_key: str, timeout: float = 30.0) -> dict | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except Exception:  # an endpoint that is not ours has no stats: the row goes without
        return None


def _step_figures(before: dict | None, after: dict | None) -> dict[str, Any]:
    """Per-step figures from two snapshots of ``VerifierReplica.stats``."""
    none = dict(step_ms=None, draft_ms=None, drafted=None, sent_bytes=None, received_bytes=None, fallback_steps=None)
    if not before or not after or before.get("session") != after.get("session"):
        return none  # no stats, or another replica answered: the difference would mean nothing
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float)) and k in before}
    steps = d.get("steps", 0)
    if steps <= 0:
        return none
    plain = after.get("topology") == "plain"
    if plain:
        drafting = 0
    elif "draft_steps" in d:  # steps that ran a draft pass (a failed pass included: its time was spent)
        drafting = d["draft_steps"]
    else:  # an older server: every step the policy did not skip
        drafting = steps - d.get("skipped_draft_steps", 0) - d.get("fallback_steps", 0)
    calls = d.get("draft_calls", 0)
    return dict(
        step_ms=1e3 * (d.get("draft_s", 0.0) + d.get("verify_s", 0.0)) / steps,
        draft_ms=1e3 * d.get("draft_s", 0.0) / drafting if drafting > 0 else None,
        drafted=drafting / steps,
        sent_bytes=d["draft_sent_bytes"] / calls if calls and "draft_sent_bytes" in d else None,
        received_bytes=d["draft_received_bytes"] / calls if calls and "draft_received_bytes" in d else None,
        fallback_steps=int(d.get("fallback_steps", 0)),
    )


def run_serve_bench(endpoints: Sequence[Endpoint], *, concurrency: Sequence[int], max_tokens: int = 64,
                    min_requests: int = 8, warmup: int = 2, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[ServeBenchRow]:
    """The sweep (see the module docstring); endpoints take turns within each concurrency."""
    from tqdm.auto import tqdm

    counts = {c: max(2 * c, min_requests) for c in concurrency}
    prompts = text_prompts(max(counts.values()), seed=seed)
    plain = next((e for e in endpoints if e.label == "plain"), None)
    for e in endpoints:  # warm-up: first requests pay lazy set-up (tokenizer, kernels, sessions)
        run_load_sync(e.url, e.model, [LoadRequest(p, max_tokens=8) for p in prompts[:warmup]],
                      concurrency=warmup, api_key=e.api_key)
    rows: list[ServeBenchRow] = []
    total = sum(counts[c] for c in concurrency) * len(endpoints)
    with tqdm(total=total, desc="bench serve", unit="req", disable=progress is None) as bar:
        for c in concurrency:
            reqs = [LoadRequest(p, max_tokens=max_tokens, temperature=0.0) for p in prompts[: counts[c]]]
            texts: dict[str, list[str]] = {}
            for e in endpoints:
                bar.set_postfix_str(f"{e.label} @ C={c}")
                before = _get_json(e.stats_url, e.api_key)
                records, seconds = run_load_sync(e.url, e.model, reqs, concurrency=c, api_key=e.api_key,
                                                 progress=lambda _r: bar.update(1))
                after = _get_json(e.stats_url, e.api_key)
                texts[e.label] = [r.text if r.error is None else None for r in records]
                errors = [r.error for r in records if r.error is not None]
                rows.append(ServeBenchRow(e.label, c, summarize(records, seconds), **_step_figures(before, after),
                                          mismatches=None, first_error=errors[0] if errors else None))
            if plain is not None:  # greedy: every speculative output must be the plain output
                ref = texts["plain"]
                for i, row in enumerate(rows):
                    if row.concurrency == c and row.label != "plain":
                        # pairs where both succeeded (failures are counted in their own column)
                        bad = sum(1 for a, b in zip(texts[row.label], ref) if a is not None and b is not None and a != b)
                        rows[i] = _replace(row, mismatches=bad)
    return rows


def _replace(row: ServeBenchRow, **kw: Any) -> ServeBenchRow:
    import dataclasses

    return dataclasses.replace(row, **kw)


# ------------------------------------------------------------------------------------- local launch
@contextlib.contextmanager
def launch_local(args: dict, *, variants: Sequence[str] = VARIANTS, port: int = 8000, num_cpus: int | None = None,
                 log: Callable[[str], None] = print) -> Iterator[list[Endpoint]]:
    """Start ``args`` (a ServeConfig mapping) as one application per variant on a local Ray
    instance, yield their endpoints, and shut Serve and Ray down afterwards."""
    import ray
    from ray import serve

    from dspark.platform.serving.app import app_builder
    from dspark.platform.serving.cli import prepare_args
    from dspark.platform.serving.config import ServeConfig

    base = prepare_args(ServeConfig.model_validate(args).model_dump(mode="json"), log=log)
    if base.get("drafter_path") is None:
        variants = [v for v in variants if v == "plain"]
    _check_port_free(port)
    started_ray = not ray.is_initialized()
    if started_ray:
        # logical CPUs: enough for every variant's reservations (the apps take turns under load)
        cfg = ServeConfig.model_validate(base)
        need = len(variants) * sum(d.num_cpus * (d.autoscaling.max_replicas if d.autoscaling else d.num_replicas)
                                   for d in (cfg.verifier, cfg.draft_worker, cfg.ingress_deployment)) + 1
        ray.init(num_cpus=max(num_cpus or 0, int(need) + 1, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        endpoints = []
        for v in variants:
            a = copy.deepcopy(base)
            if v == "plain":
                a["drafter_path"] = None
                a["use_scheduler"] = False
                a["policy"] = {"name": "off"}
            else:
                a["topology"] = v
            log(f"starting {v} ...")
            serve.run(app_builder(a), name=f"bench-{v}", route_prefix=f"/{v}", blocking=False)
            endpoints.append(Endpoint(v, f"http://127.0.0.1:{port}/{v}/v1", a["model_name"]))
        for e in endpoints:
            _wait_ready(e)
        yield endpoints
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if started_ray:
            ray.shutdown()


def _check_port_free(port: int) -> None:
    """Refuse a port another server listens on: its answers would be taken for ours."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} on 127.0.0.1 is already in use; pick another with --port")


def _wait_ready(e: Endpoint, timeout_s: float = 600.0) -> None:
    import time

    t0 = time.monotonic()
    health = e.url.rstrip("/").removesuffix("/v1") + "/health"
    while time.monotonic() - t0 < timeout_s:
        if _get_json(health, e.api_key, timeout=5.0) is not None:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{e.label} did not become ready in {timeout_s:.0f} s ({health})")


# ------------------------------------------------------------------------------------- report
def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def render_markdown(rows: Sequence[ServeBenchRow], *, max_tokens: int) -> str:
    from dspark.platform.bench.report import markdown_table

    heads = ["endpoint", "C", "requests", "failed", "agg tok/s", "per-user tok/s", "TTFT p50 / p99 ms",
             "ITL p50 / p99 ms", "tokens/step", "step ms", "draft ms", "drafted", "bytes/call out / in", "mismatches"]
    table = []
    for r in rows:
        s = r.load
        table.append([
            r.label, r.concurrency, s.requests, s.failed, _f(s.aggregate_tps), _f(s.per_user_tps),
            f"{_f(s.ttft_p50 and 1e3 * s.ttft_p50, '{:.0f}')} / {_f(s.ttft_p99 and 1e3 * s.ttft_p99, '{:.0f}')}",
            f"{_f(s.itl_p50 and 1e3 * s.itl_p50)} / {_f(s.itl_p99 and 1e3 * s.itl_p99)}",
            _f(s.tokens_per_step, "{:.2f}"), _f(r.step_ms), _f(r.draft_ms), _f(r.drafted, "{:.0%}"),
            "–" if r.sent_bytes is None else f"{r.sent_bytes:,.0f} / {r.received_bytes:,.0f}",
            "–" if r.mismatches is None else r.mismatches,
        ])
    out = [f"{max_tokens} new tokens per request (greedy, end-of-text ignored); ITL = gaps between streamed "
           "chunks (a chunk can carry an accepted block); step ms = (draft + verify) per verify step of the replica; "
           "draft ms per drafting step (one RPC when disaggregated); bytes per draft call; mismatches = greedy outputs "
           "that differ from the plain endpoint's.", "", markdown_table(heads, table), ""]
    out += _ratios(rows)
    out += [f"- {r.label} at C={r.concurrency}: {r.load.failed} failed, first error: {r.first_error}"
            for r in rows if r.first_error]
    return "\n".join(out)


def _ratios(rows: Sequence[ServeBenchRow]) -> list[str]:
    by = {(r.label, r.concurrency): r for r in rows}
    out = []
    for c in sorted({r.concurrency for r in rows}):
        plain, dis, col = by.get(("plain", c)), by.get(("disaggregated", c)), by.get(("colocated", c))
        parts = []
        for r in (dis, col):
            if r is not None and plain is not None and plain.load.aggregate_tps > 0:
                parts.append(f"{r.label} {r.load.aggregate_tps / plain.load.aggregate_tps:.2f}× plain")
        if dis and col and dis.draft_ms and col.draft_ms:
            parts.append(f"a drafting step's draft pass {dis.draft_ms - col.draft_ms:+.1f} ms disaggregated vs colocated")
        if dis and col and dis.step_ms and col.step_ms and dis.drafted is not None and col.drafted is not None \
                and abs(dis.drafted - col.drafted) <= 0.1:  # steps compare only when both drafted alike
            parts.append(f"disaggregated step {dis.step_ms / col.step_ms - 1:+.0%} vs colocated")
        if parts:
            out.append(f"- C={c}: " + ", ".join(parts))
    return out


def plot(rows: Sequence[ServeBenchRow], path: Any, title: str = "Serving sweep (openai client)") -> None:
    """Aggregate tokens/s, per-user tokens/s and TTFT p50 against concurrency, one line per endpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in rows))
    conc = sorted({r.concurrency for r in rows})
    by = {(r.label, r.concurrency): r for r in rows}
    panels = [("aggregate tokens/s", lambda s: s.aggregate_tps), ("per-user tokens/s", lambda s: s.per_user_tps),
              ("TTFT p50 (ms)", lambda s: s.ttft_p50 and 1e3 * s.ttft_p50)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, get) in zip(axes, panels):
        for i, lab in enumerate(labels):
            pts = [(c, get(by[(lab, c)].load)) for c in conc if (lab, c) in by]
            pts = [(c, y) for c, y in pts if y is not None]
            style = dict(color="k", ls="--") if lab == "plain" else dict(color=f"C{i % 10}")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD"[i % 5], ms=4, label=lab, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent streams (C)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
