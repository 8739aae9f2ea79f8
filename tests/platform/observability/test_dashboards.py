"""The Grafana dashboards: the committed JSON is exactly what the one Python definition renders,
every PromQL expression names only series that ``metrics.py`` defines (and every metric is shown
somewhere), and the JSON has the structure Grafana needs. Real Prometheus parsing every
expression is in test_prometheus.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark.platform.observability import dashboards as D
from dspark.platform.observability import metrics as M

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "clusters" / "grafana"

# PromQL functions, aggregation operators and keywords the expressions may use
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate", "histogram_quantile",
    "clamp_min", "clamp_max", "topk", "bottomk", "and", "or", "unless", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "abs", "vector", "scalar", "time",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left after removing label matchers
    ({...}), range/subquery brackets ([...]), strings, numbers, grouping clauses (by/without
    (...)), function calls and PromQL keywords. Whatever is left must be a series name."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        following = e[m.end():].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def all_expressions() -> list[tuple[str, str]]:
    """(dashboard title, expression) for every panel target and every variable query."""
    out = []
    for d in D.DASHBOARDS:
        model = D.render(d)
        for p in model["panels"]:
            out += [(d.title, t["expr"]) for t in p["targets"]]
        for v in model["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\(([^,]+),\s*([A-Za-z_]+)\)", v["query"]["query"])
                assert m, v["query"]
                out.append((d.title, m.group(1)))
    return out


def test_committed_json_is_exactly_the_rendered_definition():
    rendered = D.render_all()
    assert sorted(p.name for p in COMMITTED.glob("*.json")) == sorted(rendered), \
        "clusters/grafana/ must hold exactly the generated dashboards (run: dspark dashboards render)"
    for name, text in rendered.items():
        assert (COMMITTED / name).read_text(encoding="utf-8") == text, \
            f"{name} differs from the definition: regenerate with `dspark dashboards render`, never edit by hand"


def test_render_command_writes_the_same_files(tmp_path):
    from dspark.platform.observability.dashboards_cli import dashboards_group

    res = CliRunner().invoke(dashboards_group, ["render", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for p in COMMITTED.glob("*.json"):
        assert (tmp_path / p.name).read_bytes() == p.read_bytes()


def test_every_expression_references_only_defined_metrics():
    known = M.exported_series()
    for title, expr in all_expressions():
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= known, f"{title}: {expr} names undefined series {sorted(names - known)}"


def test_the_name_check_catches_unknown_and_misspelt_names():
    assert metric_names('sum by (le) (rate(ray_dspark_x_bucket{a="b", le="0.5"}[$__rate_interval]))') == \
        {"ray_dspark_x_bucket"}
    assert metric_names("max by (replica) (ray_dspark_queue_depth)") == {"ray_dspark_queue_depth"}
    assert metric_names("a_total / on (x) b") == {"a_total", "b"}
    known = M.exported_series()
    assert not metric_names("sum(rate(ray_dspark_requests[1m]))") <= known  # a counter without _total
    assert not metric_names("ray_dspark_queue_depth_total") <= known


def test_every_metric_is_on_some_dashboard():
    used = set().union(*(metric_names(e) for _, e in all_expressions()))
    missing = [m.name for m in M.METRICS if not set(m.series()) & used]
    assert missing == []


@pytest.mark.parametrize("d", D.DASHBOARDS, ids=lambda d: d.uid)
def test_dashboard_structure(d):
    model = D.render(d)
    assert model["id"] is None and model["uid"] == d.uid and len(d.uid) <= 40
    var_names = [v["name"] for v in model["templating"]["list"]]
    assert var_names[0] == "datasource" and model["templating"]["list"][0]["query"] == "prometheus"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in model["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels overlap in {d.title}"
                cells.add((x, y))
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and p["targets"]
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in var_names, (p["title"], var)
    json.dumps(model)  # plain JSON


def test_uids_and_files_are_unique():
    assert len({d.uid for d in D.DASHBOARDS}) == len({d.file for d in D.DASHBOARDS}) == len(D.DASHBOARDS) == 4
