"""``dspark dashboards push`` against a stand-in Grafana.

No Grafana server can be installed on the test machines, so this runs the real command (through
the real ``grafana_client`` library and HTTP) against a local stdlib HTTP server that checks each
request against Grafana's documented HTTP API: the paths and methods (``GET
/api/datasources/name/:name``, ``GET``/``POST /api/folders``, ``POST /api/dashboards/db``), the
``Authorization: Bearer`` header, JSON content type, and the body shapes (``{"title", "uid"}`` for a
folder; ``{"dashboard", "folderUid"/"folderId", "overwrite", "message"}`` for a dashboard, whose
``id`` is null and ``uid`` set). It answers the way Grafana documents (401 on a bad token, 404
for an unknown data source, a new version on overwrite). What it cannot show is that a real
Grafana renders the panels.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from dspark.platform.observability.dashboards import DASHBOARDS
from dspark.platform.observability.dashboards_cli import dashboards_group, push_command
from dspark.platform.observability.grafana import GrafanaPushError, grafana_url, read_token

TOKEN = "glsa_secretTOKEN_0123456789abcdef"
DS_UID = "PBFA97CFB590B2093"


class FakeGrafana:
    """State and request log of the stand-in Grafana."""

    def __init__(self, datasources=None):
        self.datasources = datasources if datasources is not None else {"Prometheus": "prometheus"}
        self.folders: list[dict] = []
        self.dashboards: dict[str, dict] = {}  # uid -> {"version", "folderUid", "dashboard"}
        self.log: list[tuple[str, str]] = []
        self.problems: list[str] = []  # requests that break the documented API


def make_handler(g: FakeGrafana):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"message": "Unauthorized"})
                return False
            return True

        def _json(self):
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                g.problems.append(f"{self.path}: Content-Type {self.headers.get('Content-Type')}")
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"null")

        def do_GET(self):
            g.log.append(("GET", self.path))
            if not self._authorised():
                return
            if self.path.startswith("/api/datasources/name/"):
                name = self.path.rsplit("/", 1)[1]
                if name not in g.datasources:
                    return self._send(404, {"message": "Data source not found"})
                return self._send(200, {"id": 1, "uid": DS_UID, "orgId": 1, "name": name,
                                        "type": g.datasources[name], "access": "proxy", "url": "http://prom:9090"})
            if self.path == "/api/folders":
                return self._send(200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in g.folders])
            g.problems.append(f"GET {self.path} is not an endpoint the push should use")
            self._send(404, {"message": "Not found"})

        def do_POST(self):
            g.log.append(("POST", self.path))
            if not self._authorised():
                return
            body = self._json()
            if self.path == "/api/folders":
                if not isinstance(body, dict) or not isinstance(body.get("title"), str) or set(body) - {"title", "uid",
                                                                                                       "parentUid"}:
                    g.problems.append(f"bad folder body {body}")
                    return self._send(400, {"message": "bad request data"})
                if any(f["uid"] == body.get("uid") or f["title"] == body["title"] for f in g.folders):
                    return self._send(409, {"message": "a folder with the same name or uid already exists"})
                f = {"id": 10 + len(g.folders), "uid": body.get("uid") or "generated", "title": body["title"]}
                g.folders.append(f)
                return self._send(200, {**f, "url": f"/dashboards/f/{f['uid']}/", "version": 1})
            if self.path == "/api/dashboards/db":
                return self._dashboard(body)
            g.problems.append(f"POST {self.path} is not an endpoint the push should use")
            self._send(404, {"message": "Not found"})

        def _dashboard(self, body):
            allowed = {"dashboard", "folderId", "folderUid", "overwrite", "message"}
            d = body.get("dashboard") if isinstance(body, dict) else None
            if not isinstance(d, dict) or set(body) - allowed:
                g.problems.append(f"bad dashboard body keys {sorted(body) if isinstance(body, dict) else body}")
                return self._send(400, {"message": "bad request data"})
            for key, ok in (("id", d.get("id") is None), ("uid", isinstance(d.get("uid"), str)),
                            ("title", isinstance(d.get("title"), str)), ("panels", isinstance(d.get("panels"), list))):
                if not ok:
                    g.problems.append(f"dashboard.{key} invalid")
            folder = next((f for f in g.folders if f["uid"] == body.get("folderUid")), None)
            if folder is None or ("folderId" in body and body["folderId"] != folder["id"]):
                g.problems.append(f"unknown folder {body.get('folderUid')}/{body.get('folderId')}")
                return self._send(400, {"message": "folder not found"})
            old = g.dashboards.get(d["uid"])
            if old is not None and body.get("overwrite") is not True:
                return self._send(412, {"message": "A dashboard with the same uid already exists",
                                        "status": "name-exists"})
            version = 1 if old is None else old["version"] + 1
            g.dashboards[d["uid"]] = {"version": version, "folderUid": folder["uid"], "dashboard": d,
                                      "message": body.get("message")}
            slug = d["title"].lower().replace(" ", "-").replace("/", "")
            self._send(200, {"id": 100 + len(g.dashboards), "uid": d["uid"], "url": f"/d/{d['uid']}/{slug}",
                             "status": "success", "version": version, "slug": slug})

    return Handler


@pytest.fixture
def grafana():
    g = FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(g))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    g.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield g
    server.shutdown()
    server.server_close()
    assert g.problems == [], g.problems


def run_push(*args, env=None):
    env = {"GRAFANA_TOKEN": TOKEN, **(env or {})}
    return CliRunner().invoke(dashboards_group, ["push", *args], env=env)


def test_push_creates_the_folder_and_installs_every_dashboard(grafana, caplog):
    caplog.set_level(logging.DEBUG)  # nothing may log the token, at any level
    res = run_push("--url", grafana.url)
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output and TOKEN not in caplog.text
    assert grafana.log[:3] == [("GET", "/api/datasources/name/Prometheus"), ("GET", "/api/folders"),
                               ("POST", "/api/folders")]
    assert grafana.log[3:] == [("POST", "/api/dashboards/db")] * len(DASHBOARDS)
    assert grafana.folders == [{"id": 10, "uid": "dspark", "title": "dspark"}]
    assert set(grafana.dashboards) == {d.uid for d in DASHBOARDS}
    for entry in grafana.dashboards.values():
        assert entry["folderUid"] == "dspark" and entry["version"] == 1
        ds_var = entry["dashboard"]["templating"]["list"][0]
        assert ds_var["name"] == "datasource" and ds_var["current"]["value"] == DS_UID
    assert "created" in res.output and "/d/dspark-serving/" in res.output


def test_second_push_finds_the_folder_and_overwrites(grafana):
    assert run_push("--url", grafana.url).exit_code == 0
    grafana.log.clear()
    res = run_push("--url", grafana.url + "/")
    assert res.exit_code == 0, res.output
    assert ("POST", "/api/folders") not in grafana.log and "found" in res.output
    assert {e["version"] for e in grafana.dashboards.values()} == {2}
    assert len(grafana.folders) == 1


def test_folder_found_by_title_under_another_uid(grafana):
    grafana.folders.append({"id": 3, "uid": "abc123", "title": "Serving"})
    res = run_push("--url", grafana.url, "--folder", "Serving", "--folder-uid", "other")
    assert res.exit_code == 0, res.output
    assert {e["folderUid"] for e in grafana.dashboards.values()} == {"abc123"}


def test_token_from_a_file_and_a_custom_env_var(grafana, tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    res = run_push("--url", grafana.url, "--token-file", str(f), env={"GRAFANA_TOKEN": "wrong"})
    assert res.exit_code == 0, res.output  # the file wins over the variable
    res = run_push("--url", grafana.url, "--token-env", "MY_TOKEN", env={"GRAFANA_TOKEN": "", "MY_TOKEN": TOKEN})
    assert res.exit_code == 0, res.output


def test_a_wrong_token_fails_without_echoing_it(grafana, caplog):
    caplog.set_level(logging.DEBUG)
    bad = "glsa_not_the_right_one_987"
    res = run_push("--url", grafana.url, env={"GRAFANA_TOKEN": bad})
    assert res.exit_code != 0 and "Grafana refused" in res.output
    assert bad not in res.output and bad not in caplog.text
    assert grafana.dashboards == {}


def test_missing_or_wrong_datasource_stops_before_writing(grafana):
    res = run_push("--url", grafana.url, "--datasource", "Thanos")
    assert res.exit_code != 0 and "no data source named 'Thanos'" in res.output
    grafana.datasources["Loki"] = "loki"
    res = run_push("--url", grafana.url, "--datasource", "Loki")
    assert res.exit_code != 0 and "not prometheus" in res.output
    assert [m for m, _ in grafana.log if m == "POST"] == []


def test_the_token_never_comes_from_the_command_line(grafana):
    assert not any("token" in p.name and p.name not in ("token_env", "token_file") for p in push_command.params)
    res = run_push("--url", grafana.url, "--token", TOKEN)
    assert res.exit_code != 0 and "No such option" in res.output
    res = run_push("--url", grafana.url, env={"GRAFANA_TOKEN": ""})
    assert res.exit_code != 0 and "GRAFANA_TOKEN" in res.output
    creds = grafana.url.replace("http://", "http://admin:admin@")
    res = run_push("--url", creds)
    assert res.exit_code != 0 and "must not carry a user or password" in res.output and "admin:admin" not in res.output
    assert grafana.log == []


def test_read_token_and_url_checks(tmp_path, monkeypatch, caplog):
    loose = tmp_path / "t"
    loose.write_text("abc\nignored\n")
    loose.chmod(0o644)
    assert read_token("UNSET_VAR_X", loose) == "abc"
    assert "chmod 600" in caplog.text
    empty = tmp_path / "e"
    empty.write_text("\n")
    with pytest.raises(GrafanaPushError, match="empty"):
        read_token(None, empty)
    with pytest.raises(GrafanaPushError, match="cannot read"):
        read_token(None, tmp_path / "missing")
    monkeypatch.setenv("SOME_TOKEN", " xyz ")
    assert read_token("SOME_TOKEN", None) == "xyz"
    with pytest.raises(GrafanaPushError):
        grafana_url("ftp://host")
    assert grafana_url("https://grafana.example.com/sub/") == "https://grafana.example.com/sub"


def test_unreachable_grafana_is_a_clear_error():
    res = run_push("--url", "http://127.0.0.1:9", "--timeout", "2")
    assert res.exit_code != 0 and "cannot reach Grafana" in res.output


def test_registered_in_the_dspark_cli():
    from dspark.platform.cli import cli

    assert set(cli.commands["dashboards"].commands) == {"push", "render"}
    assert os.environ.get("GRAFANA_TOKEN") != TOKEN  # the tests never leak it into the process
