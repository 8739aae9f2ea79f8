"""``dspark bench serve``: the serving sweep (:mod:`dspark.platform.bench.serve`) against given
endpoints (``--url LABEL=URL``, repeatable) or against the three variants of a Serve config it
starts locally (``--config SERVE.yaml``, the default being ``clusters/serve-local.yaml``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

__all__ = ["bench_serve_command", "parse_url"]


def parse_url(value: str) -> tuple[str, str]:
    """``LABEL=URL`` -> (label, url ending in /v1); a bare URL is labelled by its path."""
    label, sep, url = value.partition("=")
    if not sep:
        label, url = "", value
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"expected LABEL=http(s)://host:port/.../v1, got {value!r}", param_hint="--url")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return (label or url.split("://", 1)[1].removesuffix("/v1").split("/", 1)[-1] or "endpoint"), url


def _first_model(url: str, api_key: str) -> str:
    import openai

    try:
        models = openai.OpenAI(base_url=url, api_key=api_key, max_retries=1, timeout=30).models.list().data
    except Exception as exc:
        raise click.ClickException(f"{url}: cannot list models ({type(exc).__name__}: {exc})") from None
    if not models:
        raise click.ClickException(f"{url}: the server lists no models; pass --model")
    return models[0].id


@click.command("serve")
@click.option("--url", "urls", multiple=True, metavar="LABEL=URL",
              help="An OpenAI base URL to benchmark (repeatable); label it 'plain' to get the greedy comparison "
                   "and the ratios against plain decoding.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Start this Serve config locally as disaggregated, colocated and plain apps "
                   "(default, without --url: clusters/serve-local.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="ServeConfig override for --config (repeatable).")
@click.option("--model", default=None, help="Model id to request (default: the first one /v1/models lists).")
@click.option("--api-key-env", default=None, metavar="VAR", help="Environment variable holding the endpoints' API key.")
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="Comma-separated stream counts.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="New tokens per request.")
@click.option("--min-requests", type=click.IntRange(1), default=8, show_default=True,
              help="Requests per endpoint and concurrency: max(2·C, this).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port for --config.")
@click.option("--output", default="BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default="benchmarks/serve.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md and the plot alone.")
@click.pass_context
def bench_serve_command(ctx, urls, config_path, overrides, model, api_key_env, concurrency, max_tokens, min_requests,
                        port, output, plot_path, no_write) -> None:
    """Concurrency sweep of served endpoints with the openai client: tokens/s per user and in
    aggregate, TTFT, inter-token latency, per-step cost and draft payload, plain vs speculative."""
    from dspark.platform.cli import _int_list, _invocation, _user_errors

    conc = _int_list(ctx, None, concurrency)
    _user_errors(_run)(urls, config_path, overrides, model, api_key_env, conc, max_tokens, min_requests, port,
                       output, plot_path, no_write, _invocation(ctx))


def _run(urls, config_path, overrides, model, api_key_env, conc, max_tokens, min_requests, port, output, plot_path,
         no_write, command) -> None:
    import contextlib

    from dspark.platform.bench.report import write_section
    from dspark.platform.bench.serve import Endpoint, launch_local, plot, render_markdown, run_serve_bench

    if urls and config_path:
        raise click.UsageError("give --url endpoints or --config, not both")
    api_key = "none"
    if api_key_env:
        api_key = os.environ.get(api_key_env) or ""
        if not api_key:
            raise click.UsageError(f"the API key variable {api_key_env} is not set")
    if urls:
        parsed = [parse_url(u) for u in urls]
        if len({label for label, _ in parsed}) != len(parsed):
            raise click.BadParameter("endpoint labels must be distinct", param_hint="--url")
        endpoints = [Endpoint(label, url, model or _first_model(url, api_key), api_key) for label, url in parsed]
        launch = contextlib.nullcontext(endpoints)
        what = ", ".join(f"`{e.label}` = {e.url}" for e in endpoints)
    else:
        from dspark.platform.serving.cli import load_serve_file

        path = config_path or "clusters/serve-local.yaml"
        data = load_serve_file(path, overrides)
        args = data["applications"][0]["args"]
        launch = launch_local(args, port=port, log=lambda m: click.echo(m, err=True))
        what = (f"`{path}` started locally three times: `disaggregated` (draft workers as their own deployment), "
                f"`colocated` (drafter in the verifier replica) and `plain` (no drafter); policy "
                f"`{args['policy'].get('name')}`, max_batch_size {args['engine']['max_batch_size']}")
    with launch as endpoints:
        rows = run_serve_bench(endpoints, concurrency=conc, max_tokens=max_tokens, min_requests=min_requests,
                               progress=lambda m: click.echo(m, err=True))
    table = render_markdown(rows, max_tokens=max_tokens)
    click.echo(table)
    if no_write:
        return
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path)
    rel = os.path.relpath(Path(plot_path).resolve(), Path(output).resolve().parent)
    body = (f"Endpoints: {what}. At each concurrency C, max(2·C, {min_requests}) streaming completions through the "
            f"`openai` client, C at a time (closed loop), endpoints taking turns.\n\n{table}\n\n![serving sweep]({rel})\n")
    write_section(output, "serve", "Serving sweep (`dspark bench serve`)", body, command=command)
    click.echo(f"wrote {output} and {plot_path}", err=True)
