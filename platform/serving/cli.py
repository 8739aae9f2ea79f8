"""``dspark serve serve.yaml``: run the Serve config's applications on a local Ray instance (or
``--address`` of a cluster). The file is a Ray Serve config, the same one ``serve deploy`` takes;
each application whose import path is ours has its ``args`` validated as a ``ServeConfig`` first
(``--set`` overrides apply to those args), and the demo target is built or found before Ray
starts, so every replica reads the same directory."""

import time
from pathlib import Path

import click

from dspark.platform.config import ConfigError, apply_overrides, validate_config, yaml_load

__all__ = ["serve_command", "IMPORT_PATH", "load_serve_file", "prepare_args"]

IMPORT_PATH = "dspark.platform.serving.app:app_builder"


def load_serve_file(path: str, overrides: tuple[str, ...] = ()) -> dict:
    """The Serve config at ``path`` with our applications' args validated (and overridden)."""
    import yaml

    from dspark.platform.serving.config import ServeConfig

    try:
        data = yaml_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"serve config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    apps = data.get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps, list) or not all(isinstance(a, dict) for a in apps):
        raise ConfigError(f"{path}: a Serve config needs an 'applications' list of mappings")
    for app in apps:
        if app.get("import_path") != IMPORT_PATH:
            raise ConfigError(f"{path}: application {app.get('name')!r} imports {app.get('import_path')!r}; "
                              f"dspark serve runs {IMPORT_PATH}")
        # one line per bad field, and never the value of an unknown or secret-named field
        source = f"{path} (application {app.get('name')!r}, args{' + --set overrides' if overrides else ''})"
        args = apply_overrides(app.get("args") or {}, overrides)
        app["args"] = validate_config(ServeConfig, args, source).model_dump(mode="json")
    return data


@click.command("serve")
@click.argument("config_path", metavar="SERVE.yaml", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a ServeConfig field of every application, e.g. --set topology=colocated (repeatable).")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--detach", is_flag=True, help="Return once the apps are ready (a cluster keeps serving them).")
def serve_command(config_path, overrides, address, detach) -> None:
    """Serve the OpenAI-compatible endpoint of a Serve config until Ctrl-C."""
    from dspark.platform.cli import _user_errors

    _user_errors(_serve)(config_path, overrides, address, detach)


def prepare_args(args: dict, log=None) -> dict:
    """Make a validated ServeConfig mapping ready for replicas, in place: replicas do not run in
    this directory, so relative paths are taken from here, and the demo target is built (or
    found) here once rather than by every replica."""
    from dspark.platform.demo.build import resolve_target_path
    from dspark.platform.serving.config import ServeConfig

    cfg = ServeConfig.model_validate(args)
    if args.get("drafter_path") and not Path(args["drafter_path"]).expanduser().is_absolute():
        args["drafter_path"] = str(Path(args["drafter_path"]).expanduser().resolve())
    if cfg.ingress.api_key_file and not Path(cfg.ingress.api_key_file).expanduser().is_absolute():
        args["ingress"]["api_key_file"] = str(Path(cfg.ingress.api_key_file).expanduser().resolve())
    if cfg.target.path == "demo":
        args["target"]["path"] = str(resolve_target_path("demo", cfg.demo_target, **({"log": log} if log else {})))
    elif not Path(cfg.target.path).expanduser().is_absolute():
        args["target"]["path"] = str(Path(cfg.target.path).expanduser().resolve())
    return args


def _serve(config_path, overrides, address, detach) -> None:
    import ray
    from ray import serve

    from dspark.platform.serving.app import app_builder

    data = load_serve_file(config_path, overrides)
    for app in data["applications"]:
        prepare_args(app["args"], log=lambda m: click.echo(m, err=True))
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    http = data.get("http_options") or {}
    serve.start(http_options={k: v for k, v in http.items() if k in ("host", "port")} or None)
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    for app in data["applications"]:
        name, prefix = app.get("name", "default"), app.get("route_prefix", "/")
        click.echo(f"starting {name!r} ...", err=True)
        serve.run(app_builder(app["args"]), name=name, route_prefix=prefix, blocking=False)
        click.echo(f"{name}: OpenAI API at http://{host}:{port}{prefix.rstrip('/')}/v1 "
                   f"(model {app['args']['model_name']!r})")
    if detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("shutting down", err=True)
        serve.shutdown()
