"""Installing the dashboards into a Grafana through its HTTP API (``grafana_client``).

What :func:`push` does, in order (Grafana's documented endpoints):

1. ``GET /api/datasources/name/:name`` — the Prometheus data source the dashboards should read;
   missing, or not of type ``prometheus``, is an error before anything is written.
2. ``GET /api/folders`` — the target folder by uid (else by title); ``POST /api/folders``
   (``{"uid", "title"}``) creates it when absent.
3. ``POST /api/dashboards/db`` per dashboard with ``{"dashboard", "folderUid", "folderId",
   "overwrite": true, "message"}``: ``dashboard.id`` is null and its ``uid`` fixed, so a second
   push overwrites the same dashboards (a new version each) instead of adding copies.

Credentials. The token (a service-account token or API key, sent as ``Authorization: Bearer``)
comes from an environment variable or a file, never from the command line, where every user of
the machine could read it in the process list; :func:`grafana_url` refuses a URL that carries a
user or password for the same reason. The token is never logged or printed; error messages
carry Grafana's answer, which does not echo it.
"""

from __future__ import annotations

import copy
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dspark.platform.observability.dashboards import DASHBOARDS, Dashboard, render

__all__ = ["GrafanaPushError", "PushResult", "read_token", "grafana_url", "push"]

log = logging.getLogger(__name__)


class GrafanaPushError(RuntimeError):
    """A push that cannot go on (message is for users and never holds the token)."""


@dataclass(frozen=True)
class PushResult:
    folder_uid: str
    folder_created: bool
    datasource_uid: str
    dashboards: tuple[tuple[str, str], ...]  # (title, url path Grafana answered)


def read_token(token_env: str | None, token_file: str | Path | None) -> str:
    """The token from ``token_file`` (its first line) if given, else from ``$token_env``.
    A file readable by group or others is used but warned about."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise GrafanaPushError(f"cannot read the token file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is accessible to group/others (chmod 600 it)", path)
        token = text.splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise GrafanaPushError(f"the token file {path} is empty")
        return token
    if not token_env:
        raise GrafanaPushError("no token source: give --token-env or --token-file")
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise GrafanaPushError(f"the environment variable {token_env} holding the Grafana token is not set")
    return token


def grafana_url(url: str) -> str:
    """``url`` checked: http(s), a host, no credentials in it."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise GrafanaPushError(f"not an http(s) URL with a host: {url!r}")
    if u.username or u.password:
        raise GrafanaPushError("the URL must not carry a user or password (it would be visible in the process "
                               "list): pass the token through --token-env or --token-file")
    if u.scheme == "http" and u.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("sending the Grafana token over plain http to %s", u.hostname)
    return url.rstrip("/")


def _with_datasource(model: dict, name: str, uid: str) -> dict:
    """The dashboard with its ``datasource`` variable pinned to the resolved data source."""
    model = copy.deepcopy(model)
    for var in model["templating"]["list"]:
        if var["name"] == "datasource":
            var["current"] = {"selected": True, "text": name, "value": uid}
    return model


def push(url: str, token: str, *, folder_title: str = "dspark", folder_uid: str = "dspark",
         datasource: str = "Prometheus", dashboards: tuple[Dashboard, ...] = DASHBOARDS,
         timeout_s: float = 10.0) -> PushResult:
    """Install ``dashboards`` into the folder (created if needed), overwriting earlier versions."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    api = GrafanaApi.from_url(grafana_url(url), credential=token, timeout=timeout_s)
    try:
        try:
            ds = api.datasource.get_datasource_by_name(datasource)
        except GrafanaClientError as exc:
            if exc.status_code == 404:
                raise GrafanaPushError(f"Grafana has no data source named {datasource!r}") from None
            raise
        if ds.get("type") != "prometheus":
            raise GrafanaPushError(f"data source {datasource!r} is of type {ds.get('type')!r}, not prometheus")
        folders = api.folder.get_all_folders()
        folder = next((f for f in folders if f.get("uid") == folder_uid), None) or \
            next((f for f in folders if f.get("title") == folder_title), None)
        created = folder is None
        if created:
            folder = api.folder.create_folder(folder_title, uid=folder_uid)
        done = []
        for d in dashboards:
            body = {"dashboard": _with_datasource(render(d), datasource, ds["uid"]), "folderUid": folder["uid"],
                    "overwrite": True, "message": "dspark dashboards push"}
            if folder.get("id") is not None:  # Grafana before folder uids in this API reads folderId
                body["folderId"] = folder["id"]
            reply = api.dashboard.update_dashboard(body)
            done.append((d.title, str(reply.get("url", ""))))
    except GrafanaException as exc:
        # the exception's text is Grafana's answer (status and message), never the request headers
        raise GrafanaPushError(f"Grafana refused the push: {exc}") from None
    except OSError as exc:  # connection refused, DNS, TLS (requests' errors are OSErrors)
        raise GrafanaPushError(f"cannot reach Grafana at {url}: {type(exc).__name__}") from None
    return PushResult(folder["uid"], created, ds["uid"], tuple(done))
