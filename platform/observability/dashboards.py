"""The Grafana dashboards, defined once as data and rendered to Grafana's dashboard JSON model.

``clusters/grafana/*.json`` is generated from this module (``dspark dashboards render``) and never
edited by hand; a test renders again and compares bytes, and another checks that every PromQL
expression names only series defined in ``metrics.py``. ``dspark dashboards push`` sends the
same JSON to a Grafana (``grafana.py``).

Every dashboard has a ``datasource`` variable (any Prometheus data source; ``push`` pins the one
named on its command line) and selects series by the variables listed in its definition
(``application`` for serving, ``run`` for training). Ray adds its own labels (worker, node,
session) to every series, so every expression aggregates with ``sum by`` / ``max by`` over the
labels it shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dspark.platform.observability import metrics as M

__all__ = ["Target", "Panel", "Variable", "Dashboard", "DASHBOARDS", "render", "render_all", "write_all", "dumps"]

SCHEMA_VERSION = 39  # Grafana's dashboard JSON schema version these files follow (Grafana 10/11)
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Target:
    expr: str  # PromQL
    legend: str = ""  # Grafana legend format ({{label}} placeholders)
    instant: bool = False  # one value at the end of the range (stat / bar gauge panels)


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"  # Grafana unit id: short, s, percentunit, tokens/s as "short" with a title saying so
    description: str = ""
    kind: Literal["timeseries", "stat", "bargauge"] = "timeseries"
    width: int = 12  # of 24 columns
    height: int = 8
    max: float | None = None  # fixed axis maximum (e.g. 1 for rates)


@dataclass(frozen=True)
class Variable:
    name: str
    metric: str  # exported series whose label values fill the variable
    label: str


@dataclass(frozen=True)
class Dashboard:
    file: str  # under clusters/grafana/
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = field(default=("dspark",))


# ----------------------------------------------------------------------------- PromQL helpers
def _sel(matchers: str) -> str:
    return "{" + matchers + "}" if matchers else ""


def rate(series: str, matchers: str, by: str = "") -> str:
    grouping = f"sum by ({by}) " if by else "sum "
    return f"{grouping}(rate({series}{_sel(matchers)}{RATE}))"


def quantile(q: float, spec: M.MetricSpec, matchers: str, by: str = "") -> str:
    keys = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) (rate({spec.bucket}{_sel(matchers)}{RATE})))"


def mean(spec: M.MetricSpec, matchers: str, by: str = "") -> str:
    return f"{rate(spec.sum, matchers, by)} / {rate(spec.count, matchers, by)}"


def quantiles(spec: M.MetricSpec, matchers: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> tuple[Target, ...]:
    return tuple(Target(quantile(q, spec, matchers), f"p{round(q * 100)}") for q in qs)


def gauge(spec: M.MetricSpec, matchers: str, by: str, how: str = "sum") -> str:
    return f"{how} by ({by}) ({spec.exported}{_sel(matchers)})"


APP = 'application=~"$application"'
RUN = 'run=~"$run"'
_APP_VAR = Variable("application", M.REQUESTS.exported, "application")

# ----------------------------------------------------------------------------- serving overview
SERVING = Dashboard(
    "dspark-serving.json", "dspark-serving", "dspark / Serving overview",
    "Throughput, latency, errors and load of the OpenAI-compatible endpoint and its verifier replicas.",
    (
        Panel("Generated tokens/s", (Target(rate(M.GENERATED_TOKENS.exported, APP), "all replicas"),
                                     Target(rate(M.GENERATED_TOKENS.exported, APP, "replica"), "{{replica}}")),
              description=M.GENERATED_TOKENS.description),
        Panel("Requests/s", (Target(rate(M.REQUESTS.exported, APP, "route"), "{{route}}"),), unit="reqps",
              description=M.REQUESTS.description),
        Panel("Time to first token", quantiles(M.TIME_TO_FIRST_TOKEN, APP), unit="s",
              description=M.TIME_TO_FIRST_TOKEN.description),
        Panel("Inter-token latency", quantiles(M.INTER_TOKEN_LATENCY, APP), unit="s",
              description=M.INTER_TOKEN_LATENCY.description),
        Panel("Request latency", quantiles(M.REQUEST_LATENCY, APP), unit="s",
              description=M.REQUEST_LATENCY.description),
        Panel("Errors/s by kind", (Target(rate(M.REQUEST_ERRORS.exported, APP, "kind"), "{{kind}}"),), unit="reqps",
              description=M.REQUEST_ERRORS.description),
        Panel("Running requests", (Target(gauge(M.RUNNING_REQUESTS, APP, "replica"), "{{replica}}"),),
              description=M.RUNNING_REQUESTS.description, width=8),
        Panel("Queue depth", (Target(gauge(M.QUEUE_DEPTH, APP, "replica"), "{{replica}}"),),
              description=M.QUEUE_DEPTH.description, width=8),
        Panel("Replica load", (Target(gauge(M.REPLICA_LOAD, APP, "replica", "max"), "{{replica}}"),),
              unit="percentunit", max=1.0, description=M.REPLICA_LOAD.description, width=8),
    ),
    (_APP_VAR,),
)

# ----------------------------------------------------------------------------- speculation quality
# accepted / drafted per block position: over the rate window, and over the dashboard's range
ACCEPTANCE_BY_POSITION = (f"{rate(M.ACCEPTED_TOKENS.exported, APP, 'position')} / "
                          f"{rate(M.DRAFTED_TOKENS.exported, APP, 'position')}")
ACCEPTANCE_BY_POSITION_RANGE = (
    f"sum by (position) (increase({M.ACCEPTED_TOKENS.exported}{{{APP}}}[$__range])) / "
    f"sum by (position) (increase({M.DRAFTED_TOKENS.exported}{{{APP}}}[$__range]))")
SPECULATION = Dashboard(
    "dspark-speculation.json", "dspark-speculation", "dspark / Speculation quality",
    "How many drafts the policy verifies, how many survive, per block position, and what a step costs.",
    (
        Panel("Accepted length per verify step", (Target(mean(M.ACCEPTED_LENGTH, APP), "mean"),
                                                  *quantiles(M.ACCEPTED_LENGTH, APP, (0.5, 0.9))),
              description=M.ACCEPTED_LENGTH.description),
        Panel("Verify length chosen", (Target(mean(M.VERIFY_LENGTH, APP), "mean"),
                                       *quantiles(M.VERIFY_LENGTH, APP, (0.5, 0.9))),
              description=M.VERIFY_LENGTH.description),
        Panel("Acceptance by block position", (Target(ACCEPTANCE_BY_POSITION, "position {{position}}"),),
              unit="percentunit", max=1.0,
              description="accepted / drafted at each block position (conditional on reaching it)."),
        Panel("Acceptance by position (dashboard range)",
              (Target(ACCEPTANCE_BY_POSITION_RANGE, "{{position}}", instant=True),), unit="percentunit", max=1.0,
              kind="bargauge", description="The same ratio over the whole time range."),
        Panel("Rows decoding plainly (verify length 0)",
              (Target(rate(M.VERIFY_LENGTH.bucket, APP + ', le="0.5"') + " / " + rate(M.VERIFY_LENGTH.count, APP),
                      "share"),), unit="percentunit", max=1.0,
              description="Share of request-steps that verified no draft (policy, budget, or fallback)."),
        Panel("Verify steps/s and fallbacks/s", (Target(rate(M.VERIFY_STEP_SECONDS.count, APP), "verify steps"),
                                                Target(rate(M.FALLBACK_STEPS.exported, APP), "fallback steps")),
              description=M.FALLBACK_STEPS.description),
        Panel("Draft phase time per step", quantiles(M.DRAFT_STEP_SECONDS, APP), unit="s",
              description=M.DRAFT_STEP_SECONDS.description),
        Panel("Verify phase time per step", quantiles(M.VERIFY_STEP_SECONDS, APP), unit="s",
              description=M.VERIFY_STEP_SECONDS.description),
    ),
    (_APP_VAR,),
)

# ----------------------------------------------------------------------------- scheduler
SCHEDULER = Dashboard(
    "dspark-scheduler.json", "dspark-scheduler", "dspark / Scheduler",
    "The central scheduler's verify budgets and the load they answer to.",
    (
        Panel("Verify budget per replica (draft tokens/step)",
              (Target(gauge(M.SCHEDULER_BUDGET, "", "replica", "max"), "{{replica}}"),),
              description=M.SCHEDULER_BUDGET.description),
        Panel("Expected goodput (tokens/s)", (Target(gauge(M.SCHEDULER_GOODPUT, "", "replica", "max"), "{{replica}}"),
                                              Target(f"sum ({gauge(M.SCHEDULER_GOODPUT, '', 'replica', 'max')})",
                                                     "cluster")),
              description=M.SCHEDULER_GOODPUT.description),
        Panel("Replicas in view", (Target(f"max ({M.SCHEDULER_REPLICAS.exported})", "replicas"),),
              kind="stat", width=6, description=M.SCHEDULER_REPLICAS.description),
        Panel("Replica load", (Target(gauge(M.REPLICA_LOAD, "", "replica", "max"), "{{replica}}"),),
              unit="percentunit", max=1.0, width=9, description=M.REPLICA_LOAD.description),
        Panel("Queued and running requests", (Target(gauge(M.QUEUE_DEPTH, "", "replica"), "queued {{replica}}"),
                                              Target(gauge(M.RUNNING_REQUESTS, "", "replica"), "running {{replica}}")),
              width=9),
    ),
)

# ----------------------------------------------------------------------------- training
TRAINING = Dashboard(
    "dspark-training.json", "dspark-training", "dspark / Training",
    "Drafter training: loss terms, expected acceptance, throughput and step time.",
    (
        Panel("Loss terms", (Target(gauge(M.TRAIN_LOSS, RUN, "run, term", "max"), "{{run}} {{term}}"),),
              description=M.TRAIN_LOSS.description),
        Panel("Expected accepted length (τ)", (Target(gauge(M.TRAIN_TAU, RUN, "run", "max"), "{{run}}"),),
              description=M.TRAIN_TAU.description),
        Panel("Training tokens/s", (Target(rate(M.TRAIN_TOKENS.exported, RUN, "run"), "{{run}}"),),
              description=M.TRAIN_TOKENS.description),
        Panel("Step time", (Target(mean(M.TRAIN_STEP_SECONDS, RUN, "run"), "mean {{run}}"),
                            Target(quantile(0.9, M.TRAIN_STEP_SECONDS, RUN, "run"), "p90 {{run}}")),
              unit="s", description=M.TRAIN_STEP_SECONDS.description),
        Panel("Optimizer step", (Target(gauge(M.TRAIN_STEP, RUN, "run", "max"), "{{run}}"),),
              description=M.TRAIN_STEP.description),
        Panel("Learning rate", (Target(gauge(M.TRAIN_LEARNING_RATE, RUN, "run", "max"), "{{run}}"),),
              description=M.TRAIN_LEARNING_RATE.description),
    ),
    (Variable("run", M.TRAIN_STEP.exported, "run"),),
)

DASHBOARDS: tuple[Dashboard, ...] = (SERVING, SPECULATION, SCHEDULER, TRAINING)


# ----------------------------------------------------------------------------- rendering
def _variable(v: Variable) -> dict:
    query = f"label_values({v.metric}, {v.label})"
    return {"name": v.name, "label": v.name, "type": "query", "datasource": DS, "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "regex": ""}


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": p.unit}
    if p.max is not None:
        defaults.update(min=0, max=p.max)
    out = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": t.expr, "legendFormat": t.legend,
                     "range": not t.instant, "instant": t.instant} for i, t in enumerate(p.targets)],
    }
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    elif p.kind == "bargauge":
        out["options"] = {"orientation": "vertical", "displayMode": "gradient",
                          "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area"}
    return out


def render(d: Dashboard) -> dict:
    """Grafana's dashboard JSON model of ``d`` (``id`` null: Grafana assigns it; ``uid`` fixed so a
    push overwrites the same dashboard). Panels flow left to right, 24 columns a row."""
    panels, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel(p, i, x, y))
        x, row_h = x + p.width, max(row_h, p.height)
    ds_var = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
              "refresh": 1, "hide": 0, "regex": "", "current": {}, "options": []}
    return {
        "id": None, "uid": d.uid, "title": d.title, "description": d.description, "tags": list(d.tags),
        "timezone": "browser", "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION,
        "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [ds_var, *(_variable(v) for v in d.variables)]},
        "panels": panels,
    }


def dumps(model: dict) -> str:
    """The file text: stable key order as built, two-space indent, final newline."""
    return json.dumps(model, indent=2, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """File name -> file text, for every dashboard."""
    return {d.file: dumps(render(d)) for d in DASHBOARDS}


def write_all(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_all().items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths
