"""dspark's metrics through real Prometheus: a small Serve app (the tiny demo target with an
untrained DSpark drafter, colocated) answers a few requests, the scheduler actor plans a budget
and the driver records one training step; Prometheus (Debian's 2.42, found or fetched by
conftest.py) scrapes Ray's metrics agent with the sample config clusters/prometheus.yml (its
discovery file pointed at this cluster, scraping every second) until every expected
``ray_dspark_*`` series has arrived. The totals must equal what the responses reported (tokens,
drafts and acceptances per block position, errors by kind), and real Prometheus must accept
every PromQL expression of the dashboards.

The sample config itself is checked with ``promtool check config`` and for a comment on every key.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from _helpers import wait_http
from dspark.platform.observability import dashboards as D
from dspark.platform.observability import metrics as M

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "clusters" / "prometheus.yml"
APP = "obs"
WAIT_S = 90  # bound on the wait for series (Ray exports every second here, Prometheus scrapes every second)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uncommented_keys(text: str) -> list[str]:
    """Mapping keys with no comment on their line or on the line above."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(?:- )?([A-Za-z_][\w.-]*):(\s|$)", line)
        if m and "#" not in line and not (i and lines[i - 1].lstrip().startswith("#")):
            out.append(f"line {i + 1}: {m.group(1)}")
    return out


def test_sample_config_is_valid_and_commented(prometheus_binaries):
    assert uncommented_keys(SAMPLE.read_text()) == []
    assert uncommented_keys("# a\na: 1\nb: 2\n") == ["line 3: b"]
    if prometheus_binaries.promtool is None:
        pytest.skip("promtool not available beside prometheus")
    res = subprocess.run([str(prometheus_binaries.promtool), "check", "config", str(SAMPLE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- the integration test
def start_app(tiny_demo_target, tmp_path: Path, metrics_port: int, http_port: int) -> None:
    import ray
    from ray import serve

    from dspark.drafter_service.checkpoint import save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig, TargetConfig
    from dspark.platform.serving.app import app_builder
    from dspark.platform.target.loading import load_target

    path = str(tiny_demo_target.path)
    target = load_target(TargetConfig(path=path), path)
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(kind="dspark", block_size=4, num_layers=1), target)
    dpath = save_drafter(drafter, tmp_path / "drafter")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    args = {"model_name": "tiny", "target": {"path": path}, "drafter_path": str(dpath), "topology": "colocated",
            "use_scheduler": False, "engine": {"max_batch_size": 4, "max_model_len": 128},
            "policy": {"name": "fixed"}, "verifier": {"num_cpus": 0.3}}
    serve.run(app_builder(args), name=APP, route_prefix="/o", blocking=False)
    wait_http(f"http://127.0.0.1:{http_port}/o/health")


def send_requests(base: str) -> dict:
    """A few requests of every kind; returns what the responses say the metrics must add up to."""
    want = {"tokens": 0, "drafted": {}, "accepted": {}, "requests": 0, "ok": 0}

    def add_usage(u):
        want["tokens"] += u["completion_tokens"]
        for key, name in (("drafted", "drafted_at"), ("accepted", "accepted_at")):
            for k, n in enumerate(u["dspark"][name]):
                if n:
                    want[key][str(k + 1)] = want[key].get(str(k + 1), 0) + n

    ext = {"ignore_eos": True, "temperature": 0, "dspark": {"acceptance": True}}
    for prompt in ("def main(", "import os\n"):
        r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12, **ext},
                          timeout=120)
        assert r.status_code == 200, r.text
        add_usage(r.json()["usage"])
    with requests.post(f"{base}/v1/chat/completions", stream=True, timeout=120,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                             "stream": True, **ext}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    add_usage(next(c["usage"] for c in chunks if c.get("usage")))
    want["requests"] = want["ok"] = 3
    errors = {
        "model_not_found": {"model": "nope", "prompt": "x"},
        "invalid_request": {"model": "tiny", "prompt": "x", "best_of": 2},
        "context_length": {"model": "tiny", "prompt": "x", "max_tokens": 1000},
    }
    for kind, body in errors.items():
        r = requests.post(f"{base}/v1/completions", json=body, timeout=60)
        assert 400 <= r.status_code < 500, (kind, r.text)
    want["requests"] += len(errors)
    want["errors"] = dict.fromkeys(errors, 1)
    assert want["drafted"], "the fixed policy verifies drafts: per-position counts expected"
    return want


def record_scheduler_and_training() -> None:
    import ray

    from dspark.platform.contracts import Heartbeat, ReplicaInfo
    from dspark.platform.observability.recorders import TrainingMetrics
    from dspark.scheduler.actor import get_or_create_scheduler

    h = get_or_create_scheduler("dspark-obs-test", "dspark-obs-test")
    info = ReplicaInfo("replica-obs", "node-0", 8, 4, [(b, 100.0) for b in range(1, 65)])
    ray.get(h.register.remote(info), timeout=60)
    ray.get(h.heartbeat.remote(Heartbeat("replica-obs", 1, time.time(), 0.5, "busy", 1, 3, 0.6, 2.0)), timeout=60)
    TrainingMetrics("obs-run").step({"loss": 2.0, "ce": 1.5, "tokens": 1000.0, "seconds": 0.5, "step": 1,
                                     "tau_probabilistic": 1.7, "lr": 1e-4})


def start_prometheus(binary: Path, tmp: Path, metrics_port: int, port: int) -> subprocess.Popen:
    """Prometheus with the sample config: its discovery file replaced by one listing this
    cluster's metrics agent, every interval 1 s."""
    cfg = yaml.safe_load(SAMPLE.read_text())
    job = cfg["scrape_configs"][0]
    assert job["job_name"] == "ray"
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    sd = tmp / "sd.json"  # the format Ray's head node writes
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{metrics_port}"]}]))
    job["file_sd_configs"][0].update(files=[str(sd)], refresh_interval="1s")
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([str(binary), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        try:
            if requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("Prometheus did not become ready")


def query(port: int, expr: str) -> list[dict]:
    r = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): round(float(s["value"][1]), 6) for s in result}


def test_dspark_series_reach_real_prometheus(prometheus_binaries, tiny_demo_target, tmp_path):
    import ray
    from ray import serve

    metrics_port, http_port, prom_port = free_port(), free_port(), free_port()
    proc = None
    try:
        start_app(tiny_demo_target, tmp_path, metrics_port, http_port)
        want = send_requests(f"http://127.0.0.1:{http_port}/o")
        record_scheduler_and_training()
        proc = start_prometheus(prometheus_binaries.prometheus, tmp_path, metrics_port, prom_port)

        expected = M.exported_series() - set(M.FALLBACK_STEPS.series())  # no drafter failed here
        app = f'{{application="{APP}"}}'
        checks = {
            "series": lambda: {s["metric"]["__name__"] for s in query(prom_port, '{__name__=~"ray_dspark_.+"}')}
            >= expected,
            "tokens": lambda: by_label(query(prom_port, f"sum({M.GENERATED_TOKENS.exported}{app})"), "")
            == {"": want["tokens"]},
            "drafted": lambda: by_label(query(prom_port, f"sum by (position) ({M.DRAFTED_TOKENS.exported}{app})"),
                                        "position") == want["drafted"],
            "accepted": lambda: {k: v for k, v in by_label(query(
                prom_port, f"sum by (position) ({M.ACCEPTED_TOKENS.exported}{app})"), "position").items() if v}
            == want["accepted"],
            "errors": lambda: by_label(query(prom_port, f"sum by (kind) ({M.REQUEST_ERRORS.exported}{app})"), "kind")
            == want["errors"],
            "requests": lambda: by_label(query(prom_port, f"sum({M.REQUESTS.exported}{app})"), "")
            == {"": want["requests"]},
            "ttft": lambda: by_label(query(prom_port, f"sum({M.TIME_TO_FIRST_TOKEN.count}{app})"), "")
            == {"": want["ok"]},
            "budget": lambda: bool(query(prom_port, f'{M.SCHEDULER_BUDGET.exported}{{replica="replica-obs"}}')),
            # increase() needs two scrapes of a series: the acceptance-by-position panel over its range
            "panel": lambda: bool(query(prom_port, D.ACCEPTANCE_BY_POSITION_RANGE.replace("$application", APP)
                                        .replace("$__range", "10m"))),
        }
        deadline, pending = time.time() + WAIT_S, dict(checks)
        while pending and time.time() < deadline:
            pending = {k: c for k, c in pending.items() if not c()}
            if pending:
                time.sleep(1.0)
        if pending:
            have = sorted({s["metric"]["__name__"] for s in query(prom_port, '{__name__=~"ray_dspark_.+"}')})
            pytest.fail(f"not satisfied within {WAIT_S} s: {sorted(pending)}; want {want}; series {have}; "
                        f"missing {sorted(expected - set(have))}")

        # every dashboard expression is valid PromQL for real Prometheus
        subst = {"$application": APP, "$run": ".*", "$__rate_interval": "1m", "$__range": "10m"}
        for title, exprs in ((d.title, [t.expr for p in d.panels for t in p.targets]) for d in D.DASHBOARDS):
            for expr in exprs:
                for k, v in subst.items():
                    expr = expr.replace(k, v)
                query(prom_port, expr)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
