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
    "target": TargetConfig,
    "drafter": DrafterConfig,
    "demo-target": DemoTargetConfig,
    "generate": GenerateConfig,
}


def _version() -> str:
    try:
        return dist_version("dspark")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def _user_errors(fn: Callable) -> Callable:
    """Turn the project's user-facing errors into a message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dspark.platform.target.generate import PromptTooLongError
        from dspark.platform.target.loading import TargetLoadError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, TargetLoadError, PromptTooLongError) as exc:
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
    click.echo(json.dumps(SCHEMAS[name].model_json_schema(), indent=2))


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--schema", "name", type=click.Choice(sorted(SCHEMAS)), default="demo", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override (repeatable).")
@_user_errors
def config_check(path: str, name: str, overrides: tuple[str, ...]) -> None:
    """Validate a YAML file and print the resolved config."""
    cfg = load_config(SCHEMAS[name], path, overrides)
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
@_user_errors
def demo(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Run the platform on the embedded default: build (or reuse) the demo target and
    generate a completion from it."""
    _run_generate(load_config(DemoConfig, config_path, overrides))


def main() -> None:
    cli(prog_name="dspark")


if __name__ == "__main__":
    main()
