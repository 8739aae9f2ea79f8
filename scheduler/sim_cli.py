"""``dspark simulate`` and ``dspark trace record`` (click commands; the main CLI registers them).

* ``dspark trace record`` runs prompts through the real verifier engine with whole-block
  verification and writes a trace (``dspark.verifier_service.trace``). Target, engine and prompt
  sets come from an :class:`~dspark.platform.training.evaluate.EvalConfig` (``--config`` YAML plus
  ``--set a.b=c``; the target defaults to the demo target); the drafter is a checkpoint directory
  or an untrained drafter of a given kind.
* ``dspark simulate`` replays a trace against an SPS curve for every (replicas, concurrency,
  policy) point (``dspark.scheduler.simulator``), prints the tables and, unless ``--no-write``,
  writes them and a plot as the ``simulate`` section of BENCHMARKS.md.

Only click (and the config module, pydantic) load with this module: the scheduler package stays
torch-free, and the engine, torch and the drafters load when ``trace record`` runs. User errors
print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from dspark.platform.config import ConfigError, load_config

__all__ = ["simulate_command", "trace_group"]

DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64,128,256,512,1024"


def _user_errors(fn: Callable) -> Callable:
    """The main CLI's ``_user_errors``, looked up when the command runs (no import cycle with
    ``platform/cli.py``); the simulator's and the trace's own user errors become ``ConfigError``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dspark.platform.cli import _user_errors as report
        from dspark.platform.training.prompts import PromptSourceError
        from dspark.scheduler.simulator import SimulationError
        from dspark.verifier_service.trace import TraceFormatError

        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except (SimulationError, TraceFormatError, PromptSourceError) as exc:
                raise ConfigError(str(exc)) from None

        return report(run)(*args, **kwargs)

    return wrapper


def _int_list(ctx, param, value: str) -> list[int]:
    from dspark.platform.cli import _int_list as parse

    return parse(ctx, param, value)


def _invocation() -> str:
    from dspark.platform.cli import _invocation as rebuild

    return rebuild(click.get_current_context())


# ----------------------------------------------------------------------------------- simulate
@click.command("simulate")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="Trace file from `dspark trace record`.")
@click.option("--sps", "sps_spec", default="h100", show_default=True,
              help="Step-cost curve: 'h100' (H100-like step-wise curve) or a measured SPS profile (JSON).")
@click.option("--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, callback=_int_list,
              help="Concurrent requests over all replicas (comma-separated).")
@click.option("--replicas", default="1,2,4,8", show_default=True, callback=_int_list, help="Replica counts (comma-separated).")
@click.option("--policies", default=None,
              help="Comma-separated: off, fixed (the trace's γ), fixed:L, threshold, threshold:X, prefix, async "
                   "(default: all of them, fixed at 2, 4 and γ).")
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True,
              help="Simulated verify steps per replica and point, at least.")
@click.option("--min-request-steps", type=click.IntRange(0), default=4000, show_default=True,
              help="Request-steps per point, at least (small concurrencies run more steps).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seeds the draws of request trajectories.")
@click.option("--prior", type=click.FloatRange(0.0, 1.0), default=None,
              help="prefix/async: per-token acceptance assumed for a drafter without a confidence head (default 0.7).")
@click.option("--lag", type=click.IntRange(1, 64), default=None, help="async: age in steps of the confidences that size a step (default 2).")
@click.option("--refresh", type=click.IntRange(0), default=None,
              help="prefix/async: draft once after this many steps without drafting (default 64; 0 = never).")
@click.option("--draft-cost/--no-draft-cost", default=True, show_default=True,
              help="Charge (and let the policies weigh) the profile's draft pass; --no-draft-cost prices it at 0 "
                   "(the paper's Θ = τ·SPS(B)).")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default="benchmarks/simulate.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md and the plot alone.")
@_user_errors
def simulate_command(trace_path, sps_spec, concurrency, replicas, policies, steps, min_request_steps, seed, prior, lag, refresh,
                     draft_cost, output, plot_path, no_write) -> None:
    """Replay a recorded trace against an SPS curve: goodput of each verify-length policy from 1 to
    1024 concurrent requests over 1 to 8 replicas."""
    from dspark.scheduler.simulator import (
        default_policies,
        load_sps,
        parse_policies,
        plot,
        render_markdown,
        run_grid,
        without_draft_cost,
    )
    from dspark.verifier_service.trace import load_trace

    trace = load_trace(trace_path)
    traj = trace.trajectories()
    specs = parse_policies(policies, traj.gamma) if policies is not None else default_policies(traj.gamma)
    sps, sps_name = load_sps(sps_spec)
    if not draft_cost:
        sps = without_draft_cost(sps)
    drafting = (f"draft pass {1e3 * sps.draft_time_s(1):.2f} ms at 1 request, {1e3 * sps.draft_time_s(1024):.2f} ms at "
                f"1024" if getattr(sps, "draft_points", ()) else "no draft cost (drafting priced at 0)")
    params = {"prior": prior, "lag": lag, "refresh": refresh}
    click.echo(f"trace: {trace.describe()}\nSPS: {sps_name}; {drafting}", err=True)
    results = run_grid(traj, sps, specs, concurrency=concurrency, replicas=replicas, steps=steps,
                       min_request_steps=min_request_steps, seed=seed, progress=True, policy_params=params)
    table = render_markdown(results)
    click.echo(table)
    if no_write:
        return
    from dspark.platform.bench.report import write_section

    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path, title=f"Simulated goodput ({sps_name}; trace γ = {traj.gamma}, τ = {trace.tau():.2f})")
    h = trace.header
    rel = os.path.relpath(Path(plot_path).resolve(), Path(output).resolve().parent)
    body = (
        f"Trace `{Path(trace_path).name}`: drafter {h['drafter']} on {h['target']}, γ = {traj.gamma}, sampling "
        f"T = {h['temperature']:g}, {traj.num_trajectories} requests, {traj.num_rows} steps with known full-block "
        f"acceptance, recorded τ = {trace.tau():.3f}. SPS curve: {sps_name}; {drafting}. Scheduled policies: "
        + ", ".join(f"{k} {v}" for k, v in params.items() if v is not None) + (" (" if any(v is not None for v in params.values()) else "")
        + "defaults otherwise" + (")" if any(v is not None for v in params.values()) else "") + ". Per point, each replica simulates at "
        f"least {steps} steps and all replicas together at least {min_request_steps} request-steps; seed {seed}. "
        f"Every step, each running request takes its trajectory's next recorded block, the policy decides whether to "
        f"draft and picks ℓ, the request emits min(a, ℓ) + 1 tokens and the step costs d(R)·[drafted] + 1/SPS(Σ(1 + ℓ)); "
        f"finished requests are replaced at once. Goodput = emitted tokens / simulated time, summed over replicas. "
        f"Simulated, not measured.\n\n{table}\n\n![simulated goodput]({rel})\n"
    )
    curve = ("h100" if sps_spec == "h100" else Path(sps_spec).stem) + ("" if draft_cost else "-no-draft-cost")
    write_section(output, f"simulate-{curve}", f"Scheduling simulator: goodput per verify-length policy ({sps_name})", body,
                  command=_invocation())
    click.echo(f"wrote {output} and {plot_path}", err=True)


# ----------------------------------------------------------------------------------- trace
@click.group("trace")
def trace_group() -> None:
    """Engine traces: record verify steps for the scheduling simulator."""


def _overrides(base: tuple[str, ...], **flags: Any) -> list[str]:
    """Flags that were given become ``--set`` overrides (JSON is valid YAML), after the user's own."""
    return [*base, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]


@trace_group.command("record")
@click.option("--drafter", "drafter_dir", default=None, type=click.Path(), help="Drafter checkpoint directory.")
@click.option("--untrained", "kind", default=None,
              help="Record an untrained drafter of this kind instead (dspark, dflash, eagle3, mtp1).")
@click.option("--gamma", type=click.IntRange(1, 64), default=7, show_default=True, help="Block size γ of an untrained drafter.")
@click.option("--data", multiple=True,
              help="A demo-corpus split (test, validation, train) or a JSONL prompt file (repeatable; default: test).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help="Prompts per data set (default: 64).")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="New tokens per request (default: 128).")
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.0, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an EvalConfig field by dotted path, e.g. --set engine.max_batch_size=8 (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML EvalConfig file.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Trace file to write (.npz).")
@_user_errors
def trace_record(drafter_dir, kind, gamma, data, num_prompts, max_tokens, temperature, overrides, config_path, out_path) -> None:
    """Record a trace: prompts through the verifier engine with whole-block verification; per
    step and request the drafted block's confidences and how many drafts the target accepted."""
    from dspark.drafter_service.checkpoint import DrafterLoadError, load_drafter
    from dspark.drafter_service.registry import build_drafter, kinds
    from dspark.platform.config import DrafterConfig
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.loading import load_target
    from dspark.platform.training.evaluate import EvalConfig, load_prompts
    from dspark.verifier_service.engine import RequestRejected
    from dspark.verifier_service.trace import record_trace, save_trace, seeded

    if (drafter_dir is None) == (kind is None):
        raise ConfigError("give exactly one of --drafter DIR and --untrained KIND")
    if kind is not None and kind not in kinds():
        raise ConfigError(f"unknown drafter kind {kind!r} (known: {', '.join(kinds())})")
    if drafter_dir is not None and not Path(drafter_dir).expanduser().is_dir():
        raise DrafterLoadError(f"drafter checkpoint directory {Path(drafter_dir).expanduser()} does not exist")
    cfg = load_config(EvalConfig, config_path,
                      _overrides(overrides, data=list(data) or None, num_prompts=num_prompts, max_tokens=max_tokens))
    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    target = load_target(cfg.target, path)
    if drafter_dir is not None:
        drafter, name = load_drafter(drafter_dir, target), str(drafter_dir)
    else:
        fields = {"kind": kind, "block_size": gamma, **({"markov_rank": 0} if kind == "dflash" else {})}
        dcfg = DrafterConfig(**fields)
        drafter, name = seeded(lambda: build_drafter(dcfg, target), cfg.seed), f"untrained {kind}"
    prompts = [p for spec in cfg.data for p in load_prompts(target.tokenizer, spec, cfg)[1]]
    click.echo(f"recording {name} (γ = {drafter.block_size}) on {len(prompts)} prompts, T = {temperature:g}, "
               f"{cfg.max_tokens} new tokens each", err=True)
    try:
        trace, _ = record_trace(target, drafter, prompts, temperature=temperature, max_tokens=cfg.max_tokens, engine=cfg.engine,
                             seed=cfg.seed, target_name=str(path), drafter_name=name)
    except RequestRejected as exc:
        raise ConfigError(str(exc)) from None
    save_trace(trace, out_path)
    click.echo(f"wrote {out_path}: {trace.describe()}")
