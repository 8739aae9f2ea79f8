"""The ``dspark`` command line.

Every command that takes a config reads YAML (``--config``) plus dotted ``--set a.b=c``
overrides, validated through one pydantic schema. User errors (bad config, missing checkpoint,
prompt too long) print one readable message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from importlib.metadata import PackageNotFoundError, version as dist_version
from typing import Callable

import click

from dspark.platform.config import (
    ConfigError,
    DemoConfig,
    DemoTargetConfig,
    DrafterConfig,
    GenerateConfig,
    TargetConfig,
    load_config,
)

SCHEMAS = {
    "demo": DemoConfig,
    "train": "dspark.platform.training.train_config:TrainConfig",
    "data": "dspark.platform.training.data_config:DataConfig",
    "eval": "dspark.platform.training.evaluate:EvalConfig",
    "serve": "dspark.platform.serving.config:ServeConfig",
    "target": TargetConfig,
    "drafter": DrafterConfig,
    "demo-target": DemoTargetConfig,
    "generate": GenerateConfig,
}


def _schema(name: str):
    """The schema class of ``name`` (training schemas are imported on demand: they pull in torch)."""
    s = SCHEMAS[name]
    if isinstance(s, str):
        import importlib

        module, cls = s.split(":")
        s = getattr(importlib.import_module(module), cls)
    return s


def _version() -> str:
    try:
        return dist_version("dspark")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def _user_errors(fn: Callable) -> Callable:
    """Turn the project's user-facing errors into a message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dspark.drafter_service.checkpoint import DrafterLoadError
        from dspark.drafter_service.providers import DrafterBuildError
        from dspark.platform.target.generate import PromptTooLongError
        from dspark.platform.target.loading import TargetLoadError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, TargetLoadError, PromptTooLongError, DrafterLoadError, DrafterBuildError) as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)

    return wrapper


def _config_options(fn: Callable) -> Callable:
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a config field by dotted path, e.g. --set generate.max_new_tokens=64 (repeatable).",
    )(fn)
    fn = click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None,
        help="YAML config file (schema: `dspark config schema demo`).",
    )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """dspark: DSpark speculative decoding on Ray — serve, train, evaluate, benchmark."""


@cli.command()
def version() -> None:
    """Print the dspark version and the versions of its main dependencies."""
    click.echo(f"dspark {_version()}")
    for dist in ("torch", "transformers", "ray", "deepspeed", "triton", "pydantic"):
        try:
            click.echo(f"  {dist} {dist_version(dist)}")
        except PackageNotFoundError:
            click.echo(f"  {dist} (not installed)")


# ----------------------------------------------------------------------------------- config
@cli.group()
def config() -> None:
    """Inspect and validate configuration files."""


@config.command("schema")
@click.argument("name", type=click.Choice(sorted(SCHEMAS)))
def config_schema(name: str) -> None:
    """Print the JSON schema of a config (field docs, types, ranges)."""
    click.echo(json.dumps(_schema(name).model_json_schema(), indent=2))


@config.command("reference")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the markdown here (e.g. docs/configuration.md) instead of printing it.")
def config_reference(out_path: str | None) -> None:
    """Markdown reference of every config file's fields (type, default, description), generated
    from the schemas; docs/configuration.md is its output."""
    from pathlib import Path

    from dspark.platform.reference import render_reference

    text = render_reference()
    if out_path is None:
        click.echo(text, nl=False)
        return
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(text, encoding="utf-8")
    click.echo(f"wrote {out_path}", err=True)


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--schema", "name", type=click.Choice(sorted(SCHEMAS)), default="demo", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@_user_errors
def config_check(path: str, name: str, overrides: tuple[str, ...]) -> None:
    """Validate a YAML file and print the resolved config."""
    cfg = load_config(_schema(name), path, overrides)
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


# ----------------------------------------------------------------------------------- target
@cli.group()
def target() -> None:
    """Target models: build the demo target, inspect a checkpoint."""


@target.command("build-demo")
@_config_options
@click.option("--moe", is_flag=True, help="Build the Qwen3-MoE variant (same as --set demo_target.moe=true).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@_user_errors
def target_build_demo(config_path: str | None, overrides: tuple[str, ...], moe: bool, force: bool) -> None:
    """Build (or reuse) the demo target in the cache ($DSPARK_CACHE or ~/.cache/dspark)."""
    from dspark.platform.demo.build import build_demo_target

    if moe:
        overrides = (*overrides, "demo_target.moe=true")
    cfg = load_config(DemoConfig, config_path, overrides)
    info = build_demo_target(cfg.demo_target, force=force, log=lambda m: click.echo(m, err=True))
    m = info.manifest
    state = "built" if info.built else "cached"
    click.echo(
        f"{state}: {info.path}\n  {m['architecture']}, {m['parameters'] / 1e6:.2f}M parameters, "
        f"validation loss {m['validation_loss']:.4f} (perplexity {m['validation_perplexity']:.2f}), "
        f"build {m['seconds']['total']:.0f} s"
    )


@target.command("info")
@click.argument("path", type=click.Path())
@_user_errors
def target_info(path: str) -> None:
    """Load a checkpoint directory the way the platform does and describe it."""
    from dspark.platform.target.loading import load_target

    t = load_target(TargetConfig(path=path))
    n = sum(p.numel() for p in t.model.parameters())
    click.echo(
        f"{type(t.model).__name__} ({t.config.model_type}): {n / 1e6:.2f}M parameters, "
        f"{t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}\n"
        f"default feature layers {list(t.layer_ids)} -> features of width {t.feature_dim}"
    )


# --------------------------------------------------------------------------------- generate
def _run_generate(cfg: DemoConfig) -> None:
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.generate import generate_completion
    from dspark.platform.target.loading import load_target

    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    tgt = load_target(cfg.target, path)
    generate_completion(tgt, cfg.generate.model_copy(update={"max_new_tokens": 4}))  # warm-up
    out = generate_completion(tgt, cfg.generate)
    click.secho(f"target: {path}", err=True, dim=True)
    click.echo(cfg.generate.prompt, nl=False)
    click.secho(out.text, fg="green")
    click.echo(
        f"\n{out.new_tokens} tokens in {out.seconds:.2f} s = {out.tokens_per_second:.1f} tokens/s "
        f"(plain decoding, prompt {out.prompt_tokens} tokens, "
        f"{'greedy' if cfg.generate.temperature == 0 else f'T={cfg.generate.temperature}'})"
    )


@cli.command()
@_config_options
@click.option("--prompt", default=None, help="Prompt text (overrides generate.prompt).")
@click.option("--max-new-tokens", type=int, default=None, help="Overrides generate.max_new_tokens.")
@_user_errors
def generate(config_path: str | None, overrides: tuple[str, ...], prompt: str | None, max_new_tokens: int | None) -> None:
    """Generate a completion from the target with plain decoding and print tokens/s."""
    extra = []
    if prompt is not None:
        extra.append(f"generate.prompt={json.dumps(prompt)}")
    if max_new_tokens is not None:
        extra.append(f"generate.max_new_tokens={max_new_tokens}")
    _run_generate(load_config(DemoConfig, config_path, (*overrides, *extra)))


@cli.command()
@_config_options
@click.option("--serve", "keep_serving", is_flag=True,
              help="Keep serving after the sweep (prints the URLs and a curl example) until Ctrl-C.")
@_user_errors
def demo(config_path: str | None, overrides: tuple[str, ...], keep_serving: bool) -> None:
    """The whole platform on one machine: build (or reuse) the demo target, train (or reuse) its
    DSpark drafter, serve it with Ray Serve beside plain decoding, run a concurrency sweep with
    the openai client and print tokens/s, τ, speed-up and the scheduler's budgets (plots and a
    summary go to output_dir). Options: `dspark config schema demo`, clusters/demo.yaml."""
    from dspark.platform.demo.run import run_demo

    run_demo(load_config(DemoConfig, config_path, overrides), serve_forever=keep_serving)


# ------------------------------------------------------------------------------------ bench
@cli.group()
def bench() -> None:
    """Benchmarks: each prints its figures and writes them to BENCHMARKS.md."""


def _invocation(ctx: click.Context) -> str:
    """The command as the user could retype it: ``dspark <path>`` plus every option not left at
    its default (rebuilt from the parsed parameters, so it is exact under any launcher)."""
    import shlex

    from click.core import ParameterSource

    parts = ["dspark", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        if ctx.get_parameter_source(p.name) in (ParameterSource.DEFAULT, None):
            continue
        raw = ctx.params[p.name]
        if isinstance(p, click.Argument):  # positional: the values alone
            parts += [shlex.quote(str(v)) for v in (raw if isinstance(raw, (list, tuple)) else [raw])]
            continue
        if getattr(p, "is_flag", False):
            if raw:
                parts.append(p.opts[0])
            continue
        values = raw if p.multiple else [raw]
        if isinstance(raw, list) and not p.multiple:  # a parsed comma list
            values = [",".join(map(str, raw))]
        parts += [x for v in values for x in (p.opts[0], shlex.quote(str(v)))]
    return " ".join(parts)


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter("expected one or more positive integers")
    return out


@bench.command("engine")
@_config_options
@click.option("--batch-sizes", default="1,4,16", show_default=True, callback=_int_list, help="Comma-separated.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="New tokens per request.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=64, show_default=True, help="Prompt length.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per configuration (median).")
@click.option("--drafters", default="dspark,dflash,eagle3,mtp1", show_default=True,
              help="Untrained drafters of these kinds (shape from the config's drafter section); '' for none.")
@click.option("--drafter-path", "drafter_paths", multiple=True, type=click.Path(file_okay=False),
              help="A saved drafter checkpoint directory to benchmark too (repeatable).")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default="benchmarks/engine.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md and the plot alone.")
@_user_errors
def bench_engine(config_path, overrides, batch_sizes, max_tokens, prompt_tokens, repeats, drafters, drafter_paths,
                 output, plot_path, no_write) -> None:
    """Plain vs speculative decoding in the verifier engine (no Ray): tokens/s, τ, step costs."""
    from pathlib import Path

    import torch

    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.drafter_service.registry import build_drafter, kinds
    from dspark.platform.bench.engine import plot, render_markdown, run_engine_bench
    from dspark.platform.bench.report import write_section
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.loading import load_target

    cfg = load_config(DemoConfig, config_path, overrides)
    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    tgt = load_target(cfg.target, path)
    factories = {}
    for kind in [k.strip() for k in drafters.split(",") if k.strip()]:
        if kind not in kinds():
            raise click.BadParameter(f"unknown drafter kind {kind!r} (known: {', '.join(kinds())})", param_hint="--drafters")
        fields = {**cfg.drafter.model_dump(), "kind": kind}
        if kind == "dflash":
            fields["markov_rank"] = 0
        dcfg = DrafterConfig(**fields)

        def make(dcfg=dcfg):
            torch.manual_seed(cfg.engine.seed)
            return build_drafter(dcfg, tgt)

        factories[f"{kind} (untrained)"] = make
    for p in drafter_paths:
        label = Path(p).parent.name if Path(p).name == "drafter" else Path(p).name  # a training run's drafter: the run name
        factories[label] = lambda p=p: load_drafter(p, tgt)
    rows = run_engine_bench(tgt, factories, batch_sizes=batch_sizes, max_tokens=max_tokens,
                            prompt_tokens=prompt_tokens, repeats=repeats, engine_cfg=cfg.engine)
    table = render_markdown(rows)
    click.echo(table)
    if no_write:
        return
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path)
    n_params = sum(p.numel() for p in tgt.model.parameters())
    body = (
        f"Target: {type(tgt.model).__name__}, {n_params / 1e6:.2f}M parameters ({path.name}); prompts of "
        f"{prompt_tokens} tokens from the test split, {max_tokens} new tokens each, greedy; median of {repeats} runs "
        f"after a warm-up. Every speculative run's output was checked identical to plain decoding.\n"
        f"Drafters: γ = {cfg.drafter.block_size}, {cfg.drafter.num_layers} layers. Untrained drafters draft "
        f"near-random tokens, so τ ≈ 1 and the rows measure what a step costs; trained drafters are passed "
        f"with --drafter-path.\n\n{table}\n\n![engine throughput]({plot_path})\n"
    )
    write_section(output, "engine", "Verifier engine: plain vs speculative decoding", body,
                  command=_invocation(click.get_current_context()))
    click.echo(f"wrote {output} and {plot_path}", err=True)


def _optional_int_list(ctx, param, value: str | None) -> list[int] | None:
    return None if value is None else _int_list(ctx, param, value)


@bench.command("policies")
@_config_options
@click.option("--drafter-path", type=click.Path(file_okay=False), default=None,
              help="Drafter checkpoint directory (a training run's, e.g. artifacts/runs/dspark-demo/drafter).")
@click.option("--untrained", "kind", default=None,
              help="Use an untrained drafter of this kind instead (shape from the config's drafter section).")
@click.option("--concurrency", default="1,4,16,32", show_default=True, callback=_int_list,
              help="Concurrent requests (comma-separated); the engine's max_batch_size is set to each.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="New tokens per request.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=64, show_default=True, help="Prompt length.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs per configuration (median).")
@click.option("--fixed", default=None, callback=_optional_int_list,
              help="Fixed verify lengths to compare, each 1..γ (comma-separated; default: 2, 4 and the drafter's γ).")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default="benchmarks/policies.png", show_default=True, type=click.Path(dir_okay=False),
              help="The plot; the measured SPS profile is saved beside it (.sps.json).")
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md, the plot and the profile alone.")
@_user_errors
def bench_policies(config_path, overrides, drafter_path, kind, concurrency, max_tokens, prompt_tokens, repeats, fixed,
                   output, plot_path, no_write) -> None:
    """Verify-length policies in the verifier engine (no Ray): off, fixed lengths, prefix and async
    (planning with an SPS profile measured on this engine) at each concurrency."""
    import os
    from pathlib import Path

    import torch

    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.drafter_service.registry import build_drafter, kinds
    from dspark.platform.bench.policies import fixed_lengths, measure_profile, plot, render_markdown, run_policy_bench
    from dspark.platform.bench.report import write_section
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.loading import load_target
    from dspark.verifier_service.engine import RequestRejected

    if (drafter_path is None) == (kind is None):
        raise click.UsageError("give exactly one of --drafter-path DIR and --untrained KIND")
    if kind is not None and kind not in kinds():
        raise click.BadParameter(f"unknown drafter kind {kind!r} (known: {', '.join(kinds())})", param_hint="--untrained")
    cfg = load_config(DemoConfig, config_path, overrides)
    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    tgt = load_target(cfg.target, path)
    if drafter_path is not None:
        drafter = load_drafter(drafter_path, tgt)
        d = Path(drafter_path)
        name = d.parent.name if d.name == "drafter" else d.name  # a training run's drafter: the run name
    else:
        fields = {**cfg.drafter.model_dump(), "kind": kind, **({"markov_rank": 0} if kind == "dflash" else {})}
        torch.manual_seed(cfg.engine.seed)
        drafter, name = build_drafter(DrafterConfig(**fields), tgt), f"{kind} (untrained)"
    gamma = int(drafter.block_size)
    try:
        lengths = fixed_lengths(gamma, fixed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fixed") from None
    click.echo(f"measuring the SPS profile (batch tokens 1..{max(concurrency) * (gamma + 1)}) ...", err=True)
    try:
        sps = measure_profile(tgt, drafter, max_concurrency=max(concurrency), prompt_tokens=prompt_tokens,
                              max_tokens=max_tokens, engine_cfg=cfg.engine)
        rows = run_policy_bench(tgt, drafter, sps, concurrency=concurrency, fixed=lengths, max_tokens=max_tokens,
                                prompt_tokens=prompt_tokens, repeats=repeats, engine_cfg=cfg.engine)
    except RequestRejected as exc:
        raise ConfigError(str(exc)) from None
    table = render_markdown(rows)
    click.echo(table)
    if no_write:
        return
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path, title=f"Verify-length policies: {name}, γ = {gamma}, on {path.name}")
    sps_path = sps.save(Path(plot_path).with_suffix(".sps.json"))
    rel = os.path.relpath(Path(plot_path).resolve(), Path(output).resolve().parent)
    n_params = sum(p.numel() for p in tgt.model.parameters())
    body = (
        f"Target: {type(tgt.model).__name__}, {n_params / 1e6:.2f}M parameters ({path.name}). Drafter: {name}, "
        f"γ = {gamma}. At each concurrency C, C prompts of {prompt_tokens} tokens from the test split, {max_tokens} new "
        f"tokens each, greedy, through a fresh engine with max_batch_size = C; median of {repeats} runs after a warm-up, "
        f"the runs of one C taken round-robin over the policies. `off` is plain decoding (no drafter); `fixed L` "
        f"verifies L drafts per request; `prefix` (Algorithm 1) and `async` (capacity from confidences two steps old) "
        f"plan with an SPS profile measured on this engine at start-up ({len(sps.tokens)} points, batch tokens "
        f"{sps.tokens[0]}..{sps.tokens[-1]}, {sps(sps.tokens[0]):.1f} to {sps(sps.tokens[-1]):.1f} steps/s; draft pass "
        f"{1e3 * sps.draft_time_s(1):.1f} ms at 1 request to {1e3 * sps.draft_time_s(max(concurrency)):.1f} ms at "
        f"{max(concurrency)}; `{sps_path.name}` beside the plot): a step costs d(R) + 1/SPS(B), and before drafting "
        f"they skip the draft pass when the best drafting step, sized from the last recorded confidences, would not "
        f"beat plain decoding (the committed tokens' features then reach the drafter later, in one batch). Every "
        f"speculative run's output was checked identical to plain decoding. τ = tokens per request per verify step; "
        f"mean ℓ = drafts verified per request per step; step ms = one batch step (draft + verify); drafted = share "
        f"of steps that ran a draft pass. The engine pads ragged rows to R·(1 + max ℓ) tokens while the policies "
        f"count Σ(1 + ℓ).\n\n"
        f"{table}\n\n![policy throughput]({rel})\n"
    )
    write_section(output, "policies", "Verify-length policies on the verifier engine", body,
                  command=_invocation(click.get_current_context()))
    click.echo(f"wrote {output}, {plot_path} and {sps_path}", err=True)


@bench.command("sampling")
@_config_options
@click.option("--drafter-path", type=click.Path(file_okay=False), required=True,
              help="Drafter checkpoint directory (a training run's, e.g. artifacts/runs/dspark-demo/drafter).")
@click.option("--temperatures", default="0.6,1.0", show_default=True, help="Comma-separated sampling temperatures.")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=16, show_default=True, help="Prompts per run.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="The engine's max_batch_size.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="New tokens per request.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=64, show_default=True, help="Prompt length.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Timed rounds of each mode per temperature (median).")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
@_user_errors
def bench_sampling(config_path, overrides, drafter_path, temperatures, n_requests, batch_size, max_tokens,
                   prompt_tokens, repeats, output, no_write) -> None:
    """Seeded (reproducible, matched) vs unseeded (rejection) sampling: τ, acceptance and noise cost."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.platform.bench.engine import benchmark_prompts
    from dspark.platform.bench.report import write_section
    from dspark.platform.bench.sampling import noise_cost_line, render_markdown, run_sampling_bench, section_body
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.loading import load_target

    try:
        temps = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {temperatures!r}",
                                 param_hint="--temperatures") from None
    if not temps or not all(0 < t < float("inf") for t in temps):
        raise click.BadParameter("expected one or more finite temperatures > 0", param_hint="--temperatures")
    cfg = load_config(DemoConfig, config_path, overrides)
    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    tgt = load_target(cfg.target, path)
    drafter = load_drafter(drafter_path, tgt)
    d = Path(drafter_path)
    name = d.parent.name if d.name == "drafter" else d.name
    prompts = benchmark_prompts(tgt.tokenizer, n_requests, prompt_tokens)
    with tqdm(total=len(temps), desc="temperatures", unit="T") as bar:
        rows = run_sampling_bench(tgt, drafter, prompts, temperatures=temps, max_tokens=max_tokens,
                                  batch_size=batch_size, repeats=repeats, progress=bar.update)
    gamma = int(drafter.block_size)
    table, cost = render_markdown(rows), noise_cost_line(batch_size * (gamma + 1), tgt.vocab_size)
    click.echo(f"{table}\n\n{cost}")
    if no_write:
        return
    body = section_body(f"{name}, γ = {gamma}, on {path.name}", n_requests, prompt_tokens, max_tokens, batch_size,
                        repeats, f"{table}\n\n{cost}")
    write_section(output, "sampling", "Seeded vs unseeded sampling: the cost of reproducibility", body,
                  command=_invocation(click.get_current_context()))
    click.echo(f"wrote {output}", err=True)


@bench.command("train")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@click.option("--workers", default="1,2", show_default=True, callback=_int_list, help="Worker counts to compare.")
@click.option("--steps", type=click.IntRange(3), default=12, show_default=True, help="Optimizer steps per worker count.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Leading steps left out of the figures.")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only.")
@_user_errors
def bench_train(config_path, overrides, workers, steps, warmup, output, no_write) -> None:
    """Training throughput (tokens/s) with 1, 2, … Ray Train workers and the scaling efficiency."""
    from dspark.platform.bench.report import write_section
    from dspark.platform.bench.train import render_markdown, run_train_bench
    from dspark.platform.training.train_config import TrainConfig

    if warmup >= steps:
        raise click.BadParameter("must be smaller than --steps", param_hint="--warmup")
    cfg = load_config(TrainConfig, config_path, overrides)
    rows = run_train_bench(cfg, workers, steps, warmup, log=lambda m: click.echo(m, err=True))
    table = render_markdown(rows)
    click.echo(table)
    if not no_write:
        body = (
            f"Config `{config_path}` ({cfg.drafter.kind}, γ = {cfg.drafter.block_size}, global batch "
            f"{cfg.batch.global_batch_size} sequences, micro-batch {cfg.batch.micro_batch_size}, ZeRO-{cfg.distributed.zero_stage}, "
            f"{cfg.distributed.cpus_per_worker:g} CPU per worker, online target features); {steps} steps per worker count, "
            f"median of the steps after the first {warmup}. tokens/s counts every token of every sequence in the step "
            f"(all workers); scaling efficiency = tokens/s ÷ (workers × tokens/s of 1 worker).\n\n{table}\n"
        )
        write_section(output, "train-throughput", "Drafter training throughput", body,
                      command=_invocation(click.get_current_context()))


@bench.command("drafters")
@click.argument("evals", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only.")
def bench_drafters(evals, output, no_write) -> None:
    """τ of drafters evaluated by `dspark eval` (their eval.json files or output directories),
    side by side with DSpark's ratio over each."""
    from pathlib import Path

    from dspark.platform.bench.drafters import load_evals, render_markdown
    from dspark.platform.bench.report import write_section

    loaded = load_evals([Path(e) for e in evals])
    table = render_markdown(loaded)
    click.echo(table)
    if not no_write:
        body = ("τ = tokens per verify step (accepted drafts + 1) with static verification of the whole block "
                "through the verifier engine, from each drafter's `dspark eval` run; the per-drafter sections "
                "below hold accept@k and the per-position plots.\n\n" + table + "\n")
        write_section(output, "drafters", "Drafters compared (τ)", body, command=_invocation(click.get_current_context()))


# ------------------------------------------------------------------------------------ train
@cli.command()
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@click.option("--max-failures", type=click.IntRange(0), default=1, show_default=True,
              help="Worker-group restarts from the newest checkpoint before the run fails.")
@_user_errors
def train(config_path: str, overrides: tuple[str, ...], max_failures: int) -> None:
    """Train a drafter on Ray Train + DeepSpeed (schema: `dspark config schema train`).

    Generates the data set first when data.generate_config is set and the data is missing, and
    resumes from the newest checkpoint when the run directory has one."""
    from dspark.platform.training.data_io import DataError
    from dspark.platform.training.launch import run_training
    from dspark.platform.training.train_config import TrainConfig

    cfg = load_config(TrainConfig, config_path, overrides)
    try:
        res = run_training(cfg, max_failures=max_failures, log=lambda m: click.echo(m, err=True))
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    m = res.metrics
    click.echo(
        f"trained {cfg.drafter.kind} for {res.steps} steps -> {res.drafter_dir}\n"
        f"  loss {m.get('loss', float('nan')):.4f}, τ_probabilistic {m.get('tau_probabilistic', float('nan')):.3f}, "
        f"{m.get('tokens_per_s', float('nan')):.0f} tokens/s; metrics: {res.run_dir / 'metrics.jsonl'}"
    )


def _register_subcommands() -> None:
    from dspark.platform.training.data_cli import data
    from dspark.platform.training.eval_cli import calibrate_command, eval_command

    from dspark.platform.serving.cli import serve_command
    from dspark.scheduler.sim_cli import simulate_command, trace_group

    from dspark.platform.bench.serve_cli import bench_serve_command

    cli.add_command(serve_command)
    bench.add_command(bench_serve_command)
    cli.add_command(data)
    cli.add_command(eval_command)
    cli.add_command(calibrate_command)
    cli.add_command(simulate_command)
    cli.add_command(trace_group)
    from dspark.platform.observability.dashboards_cli import dashboards_group

    cli.add_command(dashboards_group)
    from dspark.platform.reliability.cli import reliability_group

    cli.add_command(reliability_group)


_register_subcommands()


def main() -> None:
    cli(prog_name="dspark")


if __name__ == "__main__":
    main()
