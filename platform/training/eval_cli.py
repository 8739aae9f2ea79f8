"""``dspark eval`` and ``dspark calibrate`` (click commands; the main CLI registers them).

Both commands read an :class:`~dspark.platform.training.evaluate.EvalConfig` (``--config`` YAML
plus ``--set a.b=c``), with the flags below applied as overrides on top. The target defaults to
the demo target. The drafter is a checkpoint directory (``drafter_config.json`` +
``model.safetensors``). User errors (missing checkpoint, bad prompt file, prompt too long, bad
config) print one line and exit with status 2.

Only click and the config module are imported at module level; torch and the engine load when
a command runs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from dspark.platform.config import ConfigError, load_config

__all__ = ["eval_command", "calibrate_command"]


def _user_errors(fn: Callable) -> Callable:
    """The main CLI's ``_user_errors``, looked up when the command runs (so ``platform/cli.py``
    may import this module wherever it likes). Before that, evaluation's own user errors are
    turned into ``ConfigError``, which it reports."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dspark.platform.cli import _user_errors as report
        from dspark.platform.training.calibration import CalibrationError
        from dspark.platform.training.prompts import PromptSourceError
        from dspark.verifier_service.engine import RequestRejected

        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except (PromptSourceError, RequestRejected, CalibrationError) as exc:
                raise ConfigError(str(exc)) from None

        return report(run)(*args, **kwargs)

    return wrapper


def _config_options(fn: Callable) -> Callable:
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override an EvalConfig field by dotted path, e.g. --set engine.max_batch_size=8 (repeatable).",
    )(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML EvalConfig file.")(fn)
    return fn


def _float_list(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected one or more numbers")
    return out


def _overrides(base: tuple[str, ...], **flags: Any) -> list[str]:
    """Flags that were given become ``--set`` overrides (JSON is valid YAML), after the user's own."""
    return [*base, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]


def _check_drafter_dir(path: str) -> Path:
    """Fail fast, before a target is built or loaded, when the checkpoint directory is not there."""
    from dspark.drafter_service.checkpoint import CONFIG_NAME, WEIGHTS_NAME, DrafterLoadError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise DrafterLoadError(f"drafter checkpoint directory {p} does not exist")
    if not (p / CONFIG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
        raise DrafterLoadError(f"{p} is not a drafter checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    return p


def _load(cfg: Any, drafter_dir: Path):
    """(target, drafter, target path) from an EvalConfig and a checkpoint directory."""
    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.target.loading import load_target

    path = resolve_target_path(cfg.target.path, cfg.demo_target, log=lambda m: click.echo(m, err=True))
    target = load_target(cfg.target, path)
    return target, load_drafter(drafter_dir, target), path


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive
        return str(path)


# ----------------------------------------------------------------------------------- eval
@click.command("eval")
@click.option("--drafter", "drafter_dir", required=True, type=click.Path(), help="Drafter checkpoint directory.")
@click.option("--data", "data", multiple=True,
              help="Data set: a demo-corpus split (test, validation, train) or a JSONL prompt file (repeatable; default: test).")
@click.option("--temperatures", callback=_float_list, default=None, help="Comma-separated sampling temperatures (default: 0,1).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help="Prompts per data set (default: 64).")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="New tokens per request (default: 128).")
@_config_options
@click.option("--output-dir", default="eval", show_default=True, type=click.Path(file_okay=False),
              help="Where eval.json, eval.md and eval_positions.png are written.")
@click.option("--benchmarks", default=None, type=click.Path(dir_okay=False),
              help="Also write the tables and plot as a section of this BENCHMARKS.md.")
@_user_errors
def eval_command(drafter_dir, data, temperatures, num_prompts, max_tokens, config_path, overrides, output_dir, benchmarks) -> None:
    """Evaluate a drafter with static verification (whole block): τ, accept_rate@k,
    conditional acceptance and confidence per position, per data set and temperature."""
    from dspark.platform.training.evaluate import EvalConfig, evaluate_drafter, load_prompts, plot_positions

    cfg = load_config(EvalConfig, config_path, _overrides(
        overrides, data=list(data) or None, temperatures=temperatures, num_prompts=num_prompts, max_tokens=max_tokens))
    ckpt = _check_drafter_dir(drafter_dir)
    target, drafter, tpath = _load(cfg, ckpt)
    datasets = dict(load_prompts(target.tokenizer, spec, cfg) for spec in cfg.data)
    click.echo(f"evaluating {ckpt} on {', '.join(f'{k} ({len(v)} prompts)' for k, v in datasets.items())} "
               f"at T = {', '.join(f'{t:g}' for t in cfg.temperatures)}", err=True)
    result = evaluate_drafter(target, drafter, datasets, temperatures=cfg.temperatures, max_tokens=cfg.max_tokens,
                              engine=cfg.engine, seed=cfg.seed, bins=cfg.bins, name=str(ckpt), target_name=str(tpath))
    out = Path(output_dir)
    result.save_json(out / "eval.json")
    table = result.markdown()
    (out / "eval.md").write_text(table + "\n")
    png = plot_positions(result, out / "eval_positions.png")
    click.echo(table)
    if benchmarks:
        from dspark.platform.bench.report import write_section

        bench = Path(benchmarks)
        body = (
            f"Drafter `{ckpt.name}` ({result.kind}, γ = {result.gamma}, STS temperatures "
            f"{', '.join(f'{t:.2f}' for t in result.confidence_temperature)}) on target `{Path(tpath).name}`; "
            f"static verification of the whole block through the verifier engine, {cfg.max_tokens} new tokens per "
            f"prompt. τ = tokens per verify step; accept@k = P(a ≥ k | ℓ ≥ k); conditional acceptance = "
            f"P(a ≥ k | a ≥ k−1); ECE/AUROC of the predicted prefix survival Π c_j against 1[a ≥ k].\n\n"
            f"{table}\n\n![acceptance by position]({_relative(png, bench.parent)})\n"
        )
        label = ckpt.parent.name if ckpt.name == "drafter" else ckpt.name  # a training run's drafter: the run name
        write_section(bench, f"eval-{label}", f"Drafter evaluation: {label}", body)
    click.echo(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {png}" + (f"; section in {benchmarks}" if benchmarks else ""), err=True)


# ------------------------------------------------------------------------------- calibrate
@click.command("calibrate")
@click.option("--drafter", "drafter_dir", required=True, type=click.Path(), help="Drafter checkpoint directory (updated in place).")
@click.option("--data", default=None, help="A demo-corpus split or a JSONL prompt file (default: validation).")
@click.option("--temperatures", callback=_float_list, default=None,
              help="Comma-separated sampling temperatures to collect steps at, pooled (default: 1).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help="Prompts (default: 64).")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="New tokens per request (default: 128).")
@_config_options
@click.option("--output-dir", default=None, type=click.Path(file_okay=False),
              help="Where calibration.json, calibration.md and reliability.png go (default: the checkpoint directory).")
@click.option("--no-save", is_flag=True, help="Report only; leave the checkpoint's temperatures as they are.")
@click.option("--benchmarks", default=None, type=click.Path(dir_okay=False),
              help="Also write the report as a section of this file (e.g. BENCHMARKS.md).")
@_user_errors
def calibrate_command(drafter_dir, data, temperatures, num_prompts, max_tokens, config_path, overrides, output_dir, no_save,
                      benchmarks) -> None:
    """Fit Sequential Temperature Scaling of the confidence head on held-out prompts and save
    the per-position temperatures into the checkpoint."""
    from dspark.drafter_service.checkpoint import save_confidence_temperature
    from dspark.platform.training.calibration import CalibrationError, calibrate_drafter, plot_reliability
    from dspark.platform.training.evaluate import EvalConfig, load_prompts

    cfg = load_config(EvalConfig, config_path, _overrides(
        overrides, **{"calibration.data": data, "calibration.temperatures": temperatures,
                      "num_prompts": num_prompts, "max_tokens": max_tokens}))
    ckpt = _check_drafter_dir(drafter_dir)
    target, drafter, _ = _load(cfg, ckpt)
    if getattr(drafter, "confidence", None) is None:
        raise CalibrationError(f"the drafter at {ckpt} has no confidence head: nothing to calibrate")
    cal = cfg.calibration
    name, prompts = load_prompts(target.tokenizer, cal.data, cfg)
    temps = ", ".join(f"{t:g}" for t in cal.temperatures)
    click.echo(f"collecting verify steps: {name}, {len(prompts)} prompts, T = {temps}", err=True)
    report = calibrate_drafter(
        target, drafter, prompts, temperatures=cal.temperatures, max_tokens=cfg.max_tokens, engine=cfg.engine,
        seed=cfg.seed, bins=cfg.bins, t_range=(cal.t_min, cal.t_max), min_rows=cal.min_rows,
        source=f"{name}, {len(prompts)} prompts, sampling T = {temps}, {cfg.max_tokens} new tokens each",
    )
    out = Path(output_dir) if output_dir else ckpt
    report.save_json(out / "calibration.json")
    table = report.markdown()
    (out / "calibration.md").write_text(f"Fitted and measured on: {report.source}\n\n{table}\n")
    png = plot_reliability(report, out / "reliability.png")
    click.echo(table)
    click.echo(
        f"mean over positions: ECE {report.mean('ece_before'):.4f} -> {report.mean('ece_after'):.4f}, "
        f"AUROC {report.mean('auroc_before'):.3f} -> {report.mean('auroc_after'):.3f}, "
        f"Brier {report.mean('brier_before'):.4f} -> {report.mean('brier_after'):.4f} ({report.bins}-bin ECE, in-sample)"
    )
    if not no_save:
        save_confidence_temperature(ckpt, report.temperatures)
        click.echo(f"saved temperatures {[round(t, 3) for t in report.temperatures]} into {ckpt}", err=True)
    if benchmarks:
        from dspark.platform.bench.report import write_section

        bench = Path(benchmarks)
        label = ckpt.parent.name if ckpt.name == "drafter" else ckpt.name
        body = (
            f"Sequential Temperature Scaling of `{label}`'s confidence head, fitted position by position on "
            f"{report.source}. Mean over positions: ECE {report.mean('ece_before'):.4f} → {report.mean('ece_after'):.4f}, "
            f"AUROC {report.mean('auroc_before'):.3f} → {report.mean('auroc_after'):.3f}, Brier "
            f"{report.mean('brier_before'):.4f} → {report.mean('brier_after'):.4f} ({report.bins}-bin ECE of the predicted "
            f"prefix survival; in-sample — the eval section measures the saved temperatures on the test split).\n\n"
            f"{table}\n\n![reliability]({_relative(png, bench.parent)})\n"
        )
        write_section(bench, f"calibration-{label}", f"Confidence calibration: {label}", body)
    click.echo(f"wrote {out / 'calibration.json'}, {out / 'calibration.md'} and {png}", err=True)
