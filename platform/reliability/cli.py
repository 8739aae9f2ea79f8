"""``dspark reliability``: ``lossless`` (many greedy requests compared with the target's own
greedy decoding, seeded sampled requests compared with the target's own sampling) and ``soak`` (a bounded load with memory
tracking). Both start the Serve config locally (its disaggregated application) unless ``--url``
points at a running endpoint, and write their section of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

__all__ = ["reliability_group"]

DEFAULT_CONFIG = "clusters/serve-local.yaml"


@click.group("reliability")
def reliability_group() -> None:
    """Reliability of the served app: lossless under load, bounded soak with memory tracking."""


def _common(fn):
    for opt in reversed([
        click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                     type=click.Path(dir_okay=False), help="Serve config: started locally (disaggregated), and the "
                     "target the reference decodes with."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="ServeConfig override (repeatable)."),
        click.option("--url", default=None,
                     help="Test this running OpenAI base URL (…/v1) instead of starting the config."),
        click.option("--model", default=None, help="Model id for --url (default: the config's model_name)."),
        click.option("--api-key-env", default=None, metavar="VAR",
                     help="Environment variable holding --url's API key."),
        click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
                     help="HTTP port of the local application."),
        click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False)),
        click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone."),
    ]):
        fn = opt(fn)
    return fn


def _endpoint_factory(config_path, overrides, url, model, api_key_env, port):
    """(args of the config's first application, a context-manager factory yielding the Endpoint,
    a description of what is tested)."""
    from dspark.platform.bench.serve import Endpoint, launch_local
    from dspark.platform.bench.serve_cli import parse_url
    from dspark.platform.serving.cli import load_serve_file, prepare_args

    data = load_serve_file(config_path, overrides)
    args = prepare_args(data["applications"][0]["args"], log=lambda m: click.echo(m, err=True))
    if url:
        api_key = "none"
        if api_key_env:
            api_key = os.environ.get(api_key_env) or ""
            if not api_key:
                raise click.UsageError(f"the API key variable {api_key_env} is not set")
        _, base = parse_url(url)
        ep = Endpoint("url", base, model or args["model_name"], api_key)
        return args, (lambda: contextlib.nullcontext(ep)), f"Endpoint {base}"

    def serve():
        @contextlib.contextmanager
        def cm():
            with launch_local(args, variants=("disaggregated",), port=port,
                              log=lambda m: click.echo(m, err=True)) as eps:
                yield eps[0]
        return cm()

    _refuse_busy_port(port)
    what = (f"`{config_path}` started locally (disaggregated: draft workers as their own deployment; policy "
            f"`{args['policy'].get('name')}`, scheduler {'on' if args.get('use_scheduler') else 'off'}, "
            f"max_batch_size {args['engine']['max_batch_size']})")
    return args, serve, what


def _refuse_busy_port(port: int) -> None:
    """Serve's HTTP proxy binds with SO_REUSEPORT: a second local Serve instance on a port already
    served does not fail, the kernel splits the connections between the two, and each gets some of
    the other's requests (404s, connection resets when the other one stops). So check first."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise click.UsageError(f"something already listens on 127.0.0.1:{port} (another Serve instance would "
                                   "silently share the port); pick another with --port")


@reliability_group.command("lossless")
@_common
@click.option("--requests", "n_requests", type=click.IntRange(1), default=500, show_default=True,
              help="Greedy requests.")
@click.option("--concurrency", type=click.IntRange(1), default=32, show_default=True, help="Streams in flight.")
@click.option("--sampled", type=click.IntRange(0), default=64, show_default=True,
              help="Seeded sampled requests (temperature 0.8), each sent twice and compared with the "
                   "plain engine's samples for the same seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the workload.")
@click.pass_context
def lossless_command(ctx, config_path, overrides, url, model, api_key_env, port, output, no_write, n_requests,
                     concurrency, sampled, seed) -> None:
    """Greedy requests through the served app compared with the target's own greedy decoding, and
    seeded sampled requests compared with the target's own sampling for the same seed, sent twice.

    Exits 1 on any failed or mismatched greedy request, and on any seeded sample that differs from
    the plain engine's or from its repeat."""
    from dspark.platform.cli import _invocation, _user_errors

    ok = _user_errors(_lossless)(config_path, overrides, url, model, api_key_env, port, output, no_write, n_requests,
                                 concurrency, sampled, seed, _invocation(ctx))
    if not ok:
        raise SystemExit(1)


def _lossless(config_path, overrides, url, model, api_key_env, port, output, no_write, n_requests, concurrency,
              sampled, seed, command) -> bool:
    from dspark.platform.bench.report import write_section
    from dspark.platform.reliability.lossless import passed, render_markdown, run_lossless
    from dspark.platform.serving.config import ServeConfig
    from dspark.platform.target.loading import load_target

    args, serve, what = _endpoint_factory(config_path, overrides, url, model, api_key_env, port)
    cfg = ServeConfig.model_validate(args)
    target = load_target(cfg.target, cfg.target.path)
    res = run_lossless(serve, target, requests=n_requests, concurrency=concurrency, sampled=sampled,
                       max_model_len=cfg.engine.max_model_len, seed=seed, log=lambda m: click.echo(m, err=True))
    body = render_markdown(res, concurrency=concurrency, what=what)
    click.echo(body)
    if not no_write:
        write_section(output, "reliability-lossless",
                      "Reliability: lossless under load (`dspark reliability lossless`)", body, command=command)
        click.echo(f"wrote {output}", err=True)
    return passed(res)


@reliability_group.command("soak")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False),
              help="Serve config, started locally (disaggregated application; loopback only).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="ServeConfig override (repeatable).")
@click.option("--duration-s", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds of load; requests in flight then finish.")
@click.option("--clients", type=click.IntRange(1), default=64, show_default=True, help="Concurrent streaming clients.")
@click.option("--interval-s", type=click.FloatRange(0.5), default=5.0, show_default=True,
              help="Seconds between memory samples.")
@click.option("--warmup", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Fraction of the duration after which memory growth is measured.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port (127.0.0.1).")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default="benchmarks/soak-memory.png", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md and the plot alone.")
@click.pass_context
def soak_command(ctx, config_path, overrides, duration_s, clients, interval_s, warmup, port, output, plot_path,
                 no_write) -> None:
    """Bounded soak of the app started locally: streaming clients for a fixed time; failures,
    latency percentiles and the memory (RSS) of every process of the app, with a plot.

    Memory growth is measured from the end of the warm-up to the end. Exits 1 if any request
    failed."""
    from dspark.platform.cli import _invocation, _user_errors

    ok = _user_errors(_soak)(config_path, overrides, duration_s, clients, interval_s, warmup, port, output, plot_path,
                             no_write, _invocation(ctx))
    if not ok:
        raise SystemExit(1)


def _soak(config_path, overrides, duration_s, clients, interval_s, warmup, port, output, plot_path, no_write,
          command) -> bool:
    from transformers import AutoTokenizer

    from dspark.platform.bench.report import write_section
    from dspark.platform.reliability.soak import plot, render_markdown, run_soak, soak_requests

    args, serve, what = _endpoint_factory(config_path, overrides, None, None, None, port)
    tok = AutoTokenizer.from_pretrained(args["target"]["path"])
    make = soak_requests(tok, max_model_len=args["engine"]["max_model_len"])
    with serve() as endpoint:
        res = run_soak(endpoint, make, duration_s=duration_s, clients=clients, interval_s=interval_s, warmup=warmup)
    rel = None
    if not no_write:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(res, plot_path)
        rel = os.path.relpath(Path(plot_path).resolve(), Path(output).resolve().parent)
    body = render_markdown(res, what=what, plot_rel=rel)
    click.echo(body)
    if not no_write:
        write_section(output, "reliability-soak", "Reliability: bounded soak (`dspark reliability soak`)", body,
                      command=command)
        click.echo(f"wrote {output} and {plot_path}", err=True)
    return res.load.failed == 0
