"""``dspark dashboards render`` / ``dspark dashboards push``: the Grafana dashboards of
``dashboards.py`` written to files or installed into a Grafana (``grafana.py``).

There is deliberately no ``--token`` option: a token on the command line is visible to every user
of the machine in the process list. The token comes from ``--token-env`` (default
``GRAFANA_TOKEN``) or ``--token-file``.
"""

from __future__ import annotations

import click

__all__ = ["dashboards_group"]


@click.group("dashboards")
def dashboards_group() -> None:
    """Grafana dashboards (serving, speculation, scheduler, training)."""


@dashboards_group.command("render")
@click.option("--out", "out_dir", default="clusters/grafana", show_default=True,
              type=click.Path(file_okay=False), help="Directory to write the dashboard JSON files into.")
def render_command(out_dir: str) -> None:
    """Write the dashboards as Grafana JSON (what clusters/grafana/ holds)."""
    from dspark.platform.observability.dashboards import write_all

    for path in write_all(out_dir):
        click.echo(str(path))


@dashboards_group.command("push")
@click.option("--url", required=True, help="Grafana's base URL, e.g. https://grafana.example.com (no credentials).")
@click.option("--token-env", default="GRAFANA_TOKEN", show_default=True,
              help="Environment variable holding the token (service account token or API key).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File whose first line is the token (takes precedence over --token-env).")
@click.option("--folder", "folder_title", default="dspark", show_default=True, help="Folder title.")
@click.option("--folder-uid", default="dspark", show_default=True, help="Folder uid (found or created).")
@click.option("--datasource", default="Prometheus", show_default=True,
              help="Name of the Prometheus data source the dashboards read.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds per HTTP request.")
def push_command(url: str, token_env: str, token_file: str | None, folder_title: str, folder_uid: str,
                 datasource: str, timeout_s: float) -> None:
    """Install or overwrite the dashboards in a Grafana folder."""
    from dspark.platform.observability.grafana import GrafanaPushError, push, read_token

    try:
        token = read_token(token_env, token_file)
        res = push(url, token, folder_title=folder_title, folder_uid=folder_uid, datasource=datasource,
                   timeout_s=timeout_s)
    except GrafanaPushError as exc:
        raise click.ClickException(str(exc)) from None
    verb = "created" if res.folder_created else "found"
    click.echo(f"folder {folder_title!r} ({res.folder_uid}) {verb}; data source {datasource!r} ({res.datasource_uid})")
    for title, path in res.dashboards:
        click.echo(f"  {title}: {url.rstrip('/')}{path}")
