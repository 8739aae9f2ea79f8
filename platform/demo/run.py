"""``dspark demo``: the whole platform on one machine, from one command.

1. the target: the embedded demo target, built once and cached (``demo/build.py``), or a checkpoint;
2. the drafter: trained by the recipe ``train.recipe`` against that target, or reused from the cache
   or from an earlier run of the same recipe (``demo/drafter.py``);
3. a local Ray instance and the Serve config ``serve.config`` started as one speculative app per
   topology plus a plain one (``bench.serve.launch_local``), with this config's target, engine and
   the drafter; a concurrency sweep through the ``openai`` client (``bench.serve.run_serve_bench``)
   while a thread samples the central scheduler actor's per-replica verify budgets; one completion
   from each endpoint (``generate``);
4. the summary (rich table on stdout, ``summary.md`` / ``summary.json`` / ``demo.png`` /
   ``serve.png`` in ``output_dir``), then Serve and Ray shut down, or keep serving (``serve_forever``)
   until Ctrl-C.

Results go to stdout, progress and logs to stderr. Every stage's wall time is recorded.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dspark.platform.config import ConfigError, DemoConfig

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    output_dir: Path
    drafter: Any  # DrafterInfo
    rows: list  # report.DemoRow
    bench_rows: list  # bench.serve.ServeBenchRow
    completions: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    endpoints: list = field(default_factory=list)  # bench.serve.Endpoint, while the apps are up
    close: Callable[[], None] = lambda: None  # shuts the apps down


class _Stages:
    """Named wall-clock stages, announced on stderr."""

    def __init__(self, console: Any):
        self.console, self.seconds, self._t = console, {}, time.perf_counter()

    def start(self, name: str, what: str) -> None:
        self.console.rule(f"[bold]{what}", align="left")
        self._name, self._t = name, time.perf_counter()

    def done(self) -> None:
        self.seconds[self._name] = time.perf_counter() - self._t


def _serve_args(cfg: DemoConfig) -> tuple[dict, Any]:
    """The first application's ServeConfig args of ``serve.config`` with this config's target,
    demo target and engine (the drafter path is set once the drafter is known)."""
    from dspark.platform.serving.cli import load_serve_file
    from dspark.platform.serving.config import ServeConfig

    data = load_serve_file(cfg.serve.config)
    args = dict(data["applications"][0]["args"])
    args.update(target=cfg.target.model_dump(mode="json"), demo_target=cfg.demo_target.model_dump(mode="json"),
                engine=cfg.engine.model_dump(mode="json"))
    return args, ServeConfig.model_validate(args)


def _scheduler(scfg: Any) -> Any:
    """The central scheduler actor, created here so that the driver owns it and holds a handle
    while the apps run (the replicas look it up by name and keep none)."""
    if not scfg.use_scheduler:
        return None
    from dspark.scheduler.actor import get_or_create_scheduler

    return get_or_create_scheduler()


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use: pick another with --set serve.port=N") from None


def _start_ray(scfg: Any, variants: int, train_cpus: float) -> bool:
    """A local Ray instance sized for the training job and every app's reservations (logical
    CPUs: the apps take turns under load). False when Ray was already initialised here."""
    import ray

    if ray.is_initialized():
        return False
    import logging

    # the demo reports its own progress: Serve's INFO lines (app started, ready) are left out
    logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)
    deps = (scfg.verifier, scfg.draft_worker, scfg.ingress_deployment)
    serve_cpus = variants * sum(d.num_cpus * (d.autoscaling.max_replicas if d.autoscaling else d.num_replicas)
                                * (scfg.tensor_parallel_size if d is scfg.verifier else 1) for d in deps)
    ray.init(num_cpus=max(math.ceil(max(serve_cpus, train_cpus)) + 1, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, object_store_memory=200 * 2**20, logging_level=logging.WARNING)
    return True


def _get_json(url: str, timeout: float = 10.0) -> dict | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except Exception:
        return None


def _complete(endpoint: Any, cfg: DemoConfig) -> dict:
    """One completion of ``generate.prompt`` through the openai client, timed."""
    import openai

    g = cfg.generate
    client = openai.OpenAI(base_url=endpoint.url, api_key=endpoint.api_key, max_retries=0, timeout=300)
    t0 = time.perf_counter()
    r = client.completions.create(model=endpoint.model, prompt=g.prompt, max_tokens=g.max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                                  extra_body={"top_k": g.top_k, "dspark": {"acceptance": True}})
    seconds = time.perf_counter() - t0
    acc = (r.usage.model_extra or {}).get("dspark") or {}
    return {"text": r.choices[0].text, "tokens": r.usage.completion_tokens, "seconds": seconds,
            "tokens_per_s": r.usage.completion_tokens / seconds, "tokens_per_step": acc.get("tokens_per_step")}


def _sweep(endpoints: Sequence[Any], cfg: DemoConfig, watch: Any) -> list:
    from dspark.platform.bench.serve import run_serve_bench

    rows: list = []
    for i, c in enumerate(cfg.sweep.concurrency):
        watch.current = c
        rows += run_serve_bench(endpoints, concurrency=[c], max_tokens=cfg.sweep.max_tokens,
                                min_requests=cfg.sweep.min_requests, warmup=2 if i == 0 else 0,
                                progress=lambda m: None)
    watch.current = None
    return rows


def run_demo(cfg: DemoConfig, *, serve_forever: bool = False, progress: bool = True,
             out: Any = None, err: Any = None) -> DemoResult:
    """Run the demo (see the module docstring); ``out`` / ``err`` are rich consoles."""
    from rich.console import Console

    from dspark.platform.demo import report
    from dspark.platform.demo.build import resolve_target_path

    wide = None if sys.stdout.isatty() else 200  # a log file gets the whole table
    out = out or Console(width=wide, highlight=False)
    err = err or Console(stderr=True, highlight=False)
    log: Callable[[str], None] = lambda m: err.print(m, style="dim", markup=False, soft_wrap=True)  # noqa: E731
    stages = _Stages(err)
    t_all = time.perf_counter()

    # checked before anything slow: the client, the Serve file, the port, the recipe
    try:
        import openai  # noqa: F401 - the sweep and the completions go through the real client
    except ImportError:
        raise ConfigError("dspark demo needs the openai client: pip install openai (`make demo` installs it)") from None
    args, scfg = _serve_args(cfg)
    _check_port(cfg.serve.port)
    train_cpus = _plan(cfg, log)

    stages.start("target", "target")
    target_path = resolve_target_path(cfg.target.path, cfg.demo_target, progress=progress, log=log)
    log(f"target: {target_path}")
    stages.done()

    stages.start("ray", "Ray")
    variants = [*cfg.serve.topologies, "plain"]
    started_ray = _start_ray(scfg, len(variants), train_cpus)
    stages.done()
    result: DemoResult | None = None
    try:
        stages.start("drafter", "drafter")
        drafter = _drafter(cfg, target_path, log, progress)
        stages.done()
        args["drafter_path"] = str(drafter.path.resolve())
        result = _serve_and_measure(cfg, args, scfg, variants, stages, log)
        result.drafter = drafter
        _report(result, cfg, scfg, target_path, out)
        if serve_forever:
            stages.start("serving", "serving")
            _serve_until_interrupted(result.endpoints, cfg, out)
            stages.done()
        stages.start("shutdown", "shutdown")
    finally:
        if result is not None:
            result.close()  # Serve down
        if started_ray:
            import ray

            ray.shutdown()
    stages.done()
    result.seconds = {**stages.seconds, "total": time.perf_counter() - t_all}
    report.write_json(result.output_dir / "summary.json", {
        "config": cfg.model_dump(mode="json"), "target": str(target_path), "drafter": drafter, "rows": result.rows,
        "bench_rows": result.bench_rows, "completions": result.completions, "seconds": result.seconds})
    out.print(f"demo: {result.seconds['total']:.0f} s in all ("
              + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in result.seconds.items() if k != "total") + ")",
              soft_wrap=True)
    return result


def _serve_and_measure(cfg: DemoConfig, args: dict, scfg: Any, variants: list[str], stages: _Stages,
                       log: Callable[[str], None]) -> DemoResult:
    """Start the apps, run the sweep (sampling the scheduler's budgets) and the completions. The
    apps stay up until ``result.close()``."""
    import contextlib

    from dspark.platform.bench.serve import launch_local
    from dspark.platform.demo import report
    from dspark.platform.demo.budgets import BudgetWatch

    stages.start("serve_start", f"Serve: {', '.join(variants)} on 127.0.0.1:{cfg.serve.port}")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(contextlib.closing(_Held(_scheduler(scfg))))
        endpoints = stack.enter_context(launch_local(args, variants=variants, port=cfg.serve.port, log=log))
        stages.done()
        spec = [e for e in endpoints if e.label != "plain"]
        sessions = {}  # replica id (its session) -> the endpoint it serves
        for e in spec:
            s = _get_json(e.stats_url)
            if s and s.get("session"):
                sessions[s["session"]] = e.label
        stages.start("sweep", f"sweep: C = {', '.join(map(str, cfg.sweep.concurrency))} concurrent streams, "
                              f"{cfg.sweep.max_tokens} tokens per request")
        with BudgetWatch(sessions, spec[0].label if len(spec) == 1 else None) as watch:
            bench_rows = _sweep(endpoints, cfg, watch)
        stages.done()
        stages.start("completion", "completion")
        completions = {e.label: _complete(e, cfg) for e in endpoints}
        stages.done()
    except BaseException:
        stack.close()
        raise
    return DemoResult(Path(cfg.output_dir), None, report.demo_rows(bench_rows, watch.stats()), bench_rows,
                      completions, endpoints=endpoints, close=stack.close)


class _Held:
    """Keeps a Ray actor handle alive until closed (a named actor that is not detached lives only
    while a handle to it does)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def close(self) -> None:
        self.handle = None


def _plan(cfg: DemoConfig, log: Callable[[str], None]) -> float:
    """Say what a first run has to build and how long it takes; returns the CPUs training needs."""
    from dspark.platform.demo.build import MANIFEST, demo_target_dir
    from dspark.platform.demo.drafter import data_ready, estimate_seconds, find_drafter, load_recipe

    work, cpus = [], 0.0
    if cfg.target.path == "demo" and not (demo_target_dir(cfg.demo_target) / MANIFEST).is_file():
        t = cfg.demo_target  # measured: 516 s for the default's 480 steps of 8 x 256 tokens, + tokenizer
        size = (t.hidden_size * t.num_layers) / (256 * 6)
        work.append(("build the demo target", 30 + t.steps * t.batch_size * t.seq_len * 5.3e-4 * size))
    if cfg.train.drafter_path is None:
        recipe = load_recipe(cfg)
        if find_drafter(cfg, recipe, adopt=False) is None:
            target = demo_target_dir(cfg.demo_target) if cfg.target.path == "demo" else Path(cfg.target.path)
            data_s, train_s = estimate_seconds(recipe, data_ready(recipe, target))
            if data_s:
                work.append(("generate the training data", data_s))
            work.append((f"train the drafter ({recipe.path})", train_s))
            cpus = recipe.train.distributed.num_workers * recipe.train.distributed.cpus_per_worker
    if work:
        total = sum(s for _, s in work)
        log("first run: " + ", ".join(f"{w} (~{s / 60:.0f} min)" for w, s in work)
            + f": about {total / 60:.0f} min on a 2-core CPU, once (cached: later runs skip them)")
    return cpus


def _drafter(cfg: DemoConfig, target_path: Path, log: Callable[[str], None], progress: bool):
    from dspark.platform.demo.drafter import ensure_drafter
    from dspark.platform.training.data_io import DataError
    from dspark.platform.training.prompts import PromptSourceError

    try:
        d = ensure_drafter(cfg, target_path, log=log, progress=progress)
    except (DataError, PromptSourceError) as exc:
        raise ConfigError(str(exc)) from None
    how = {"given": "given (train.drafter_path)", "cache": "reused from the cache",
           "run": "reused from the recipe's run directory", "trained": f"trained in {d.seconds / 60:.1f} min"}[d.source]
    m = d.record.get("metrics") or {}
    tau = f", training τ_probabilistic {m['tau_probabilistic']:.2f}" if "tau_probabilistic" in m else ""
    log(f"drafter: {d.path} ({how}{tau})")
    return d


def _report(result: DemoResult, cfg: DemoConfig, scfg: Any, target_path: Path, out: Any) -> None:
    from dspark.platform.bench.serve import plot as serve_plot
    from dspark.platform.bench.serve import render_markdown as serve_markdown
    from dspark.platform.demo import report

    g = cfg.generate
    mode = "greedy" if g.temperature == 0 else f"T={g.temperature}"
    plain = result.completions.get("plain")
    out.print(g.prompt, end="", markup=False, soft_wrap=True)
    spec_label = next((k for k in result.completions if k != "plain"), "plain")
    text = result.completions[spec_label]["text"]
    short = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text)  # a small target likes runs of blank lines
    out.print(short, style="green", markup=False, soft_wrap=True)
    if short != text:
        out.print("(runs of blank lines shortened)", style="dim", soft_wrap=True)
    for label, c in result.completions.items():
        what = "plain decoding" if label == "plain" else f"speculative, {label}, τ {c['tokens_per_step'] or 0:.2f} tokens/step"
        same = "" if label == "plain" or plain is None or g.temperature != 0 else \
            ("; same text as plain" if c["text"] == plain["text"] else "; TEXT DIFFERS FROM PLAIN")
        out.print(f"{c['tokens']} tokens in {c['seconds']:.2f} s = {c['tokens_per_s']:.1f} tokens/s "
                  f"({what}, served, {mode}{same})", markup=False, soft_wrap=True)
    title = (f"{Path(target_path).name}, drafter {result.drafter.path.parent.name}, policy "
             f"{scfg.policy.get('name')}, max_batch_size {cfg.engine.max_batch_size}, {cfg.sweep.max_tokens} tokens "
             f"per request")
    out.print()
    out.print(report.rich_table(result.rows, f"dspark demo: {title}"))
    out.print(report.speedup_line(result.rows), markup=False, soft_wrap=True)
    if result.rows and max((r.spec.tokens_per_step or 1.0) for r in result.rows) < 1.5:
        out.print("τ near 1: the verify-length policy found that drafting does not pay here (on a CPU a draft pass "
                  "costs about as much as a verify step of a small target) and mostly decoded plainly; see the "
                  "policy benchmarks in BENCHMARKS.md.", style="dim", soft_wrap=True)
    d = result.output_dir
    d.mkdir(parents=True, exist_ok=True)
    report.plot(result.rows, d / "demo.png", f"dspark demo: {title}")
    serve_plot(result.bench_rows, d / "serve.png", title=f"dspark demo: serving sweep ({title})")
    (d / "summary.md").write_text(
        f"# dspark demo\n\n{title}. Budget: the central scheduler's verify budget for the replica (draft tokens "
        f"per step over its batch; median [range] while it had requests).\n\n{report.render_markdown(result.rows)}\n\n"
        f"{report.speedup_line(result.rows)}\n\n## Endpoints\n\n"
        f"{serve_markdown(result.bench_rows, max_tokens=cfg.sweep.max_tokens)}\n\n![demo](demo.png)\n\n![serve](serve.png)\n")
    out.print(f"wrote {d / 'demo.png'}, {d / 'serve.png'}, {d / 'summary.md'} and {d / 'summary.json'}", markup=False, soft_wrap=True)


def _serve_until_interrupted(endpoints: Sequence[Any], cfg: DemoConfig, out: Any) -> None:
    import json

    spec = next(e for e in endpoints if e.label != "plain")
    body = json.dumps({"model": spec.model, "prompt": cfg.generate.prompt, "max_tokens": 64, "temperature": 0})
    body = body.replace("'", "'\\''")  # inside single quotes on the shell
    out.print("\n[bold]serving until Ctrl-C[/] (OpenAI API):")
    for e in endpoints:
        out.print(f"  {e.label:14s} {e.url}", markup=False, soft_wrap=True)
    out.print(f"  curl {spec.url}/completions -H 'Content-Type: application/json' -d '{body}'", markup=False, soft_wrap=True)
    out.print(f"  python -c 'import openai; print(openai.OpenAI(base_url=\"{spec.url}\", api_key=\"unused\")"
              f".completions.create(model=\"{spec.model}\", prompt=\"def add(a, b):\", max_tokens=32).choices[0].text)'",
              markup=False, soft_wrap=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        out.print("shutting down")
