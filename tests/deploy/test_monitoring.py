"""deploy/monitoring: the dashboard, the alerts and the autoscaler's adapter rule ask Prometheus
only for series the real service exports, with the labels it gives them.

Every PromQL expression is parsed (promql-parser, a port of Prometheus' own parser); each series
it selects must be one the live `rarechange serve` exports on /metrics (scraped before and after a
real call), each label it matches or groups by one that series carries, or one the Prometheus
Operator adds to every scraped target. The kube_* series of kube-state-metrics are the only others.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import grpc
import promql_parser as promql
import pytest
import yaml
from conftest import MONITORING, ROOT, LiveServer, find

from serving.backends.onnxruntime import read_verified_model

DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
ADAPTER = yaml.safe_load((MONITORING / "prometheus-adapter.yaml").read_text())
RULES = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
# labels that Prometheus (through a ServiceMonitor) attaches to every series of a target
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "endpoint", "container"}
# kube-state-metrics series (not the service's), with the labels used from them
EXTERNAL = {
    "kube_deployment_status_replicas_available": {"deployment"},
    "kube_horizontalpodautoscaler_status_desired_replicas": {"horizontalpodautoscaler"},
    "kube_horizontalpodautoscaler_status_current_replicas": {"horizontalpodautoscaler"},
    "kube_horizontalpodautoscaler_spec_max_replicas": {"horizontalpodautoscaler"},
}
STATUS_CODES = {code.name for code in grpc.StatusCode}
# outcomes a client causes: never counted as server errors
CLIENT_CODES = {"OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED"}
MODELS = {read_verified_model(p)[1].name for p in (ROOT / "models").glob("*/model.onnx")}
GRAFANA = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# ----------------------------------------------------------------------------- expressions
def panels(items: list[dict]) -> Iterator[dict]:
    for item in items:
        yield item
        yield from panels(item.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for panel in panels(DASHBOARD["panels"]):
        for target in panel.get("targets", []):
            out.append((f"dashboard: {panel['title']}", target["expr"]))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, PromQL selector, label) of each label_values(...) variable."""
    out = []
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        assert var["query"]["query"] == var["definition"]
        out.append((var["name"], m[1], m[2]))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [
        (f"rule: {r.get('alert') or r.get('record')}", r["expr"])
        for group in RULES["spec"]["groups"]
        for r in group["rules"]
    ]


def adapter_queries() -> list[tuple[str, str]]:
    """The adapter's queries as it sends them for the pods of one namespace."""
    (rule,) = ADAPTER["rules"]["custom"]
    query = rule["metricsQuery"]
    query = query.replace("<<.LabelMatchers>>", 'namespace="rarechange",pod=~"rarechange-.*"')
    query = query.replace("<<.GroupBy>>", "pod")
    assert "<<" not in query, query
    return [("adapter: seriesQuery", rule["seriesQuery"]), ("adapter: metricsQuery", query)]


def parse(expr: str) -> Any:
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    return promql.parse(expr)


def walk(expr: Any) -> tuple[list[Any], list[list[str]]]:
    """Every vector selector, and every label list of by/without/on/ignoring."""
    selectors: list[Any] = []
    groupings: list[list[str]] = []

    def visit(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            selectors.append(node)
        elif kind == "AggregateExpr" and node.modifier is not None:
            groupings.append(list(node.modifier.labels))
        elif kind == "BinaryExpr" and node.modifier is not None and node.modifier.matching:
            groupings.append(list(node.modifier.matching.labels))

    promql.walk(expr, visit)
    return selectors, groupings


ALL_QUERIES = dashboard_queries() + rule_queries() + adapter_queries()


@pytest.mark.parametrize(("where", "expr"), ALL_QUERIES, ids=[w for w, _ in ALL_QUERIES])
def test_every_query_parses_and_selects_real_series(
    live_server: LiveServer, where: str, expr: str
) -> None:
    selectors, groupings = walk(parse(expr))
    assert selectors, f"{where}: selects nothing"
    available = set(TARGET_LABELS)
    for selector in selectors:
        name = selector.name
        assert name, f"{where}: a selector without a metric name"
        if name in EXTERNAL:
            labels = EXTERNAL[name] | TARGET_LABELS
        else:
            assert name.startswith("rarechange_"), f"{where}: unknown series {name}"
            assert name in live_server.sample_names, f"{where}: the service exports no {name}"
            labels = live_server.labels_of(name) | TARGET_LABELS
            own = live_server.labels_of(name)
            assert not own & TARGET_LABELS, f"{name}'s labels would clash with the target's"
        available |= labels
        for matcher in selector.matchers.matchers:
            assert matcher.name in labels, f"{where}: {name} has no label {matcher.name!r}"
            check_value(where, matcher)
    for group in groupings:
        missing = set(group) - available
        assert not missing, f"{where}: grouping by labels no selected series has: {missing}"


def check_value(where: str, matcher: Any) -> None:
    """Values of the labels the service defines: real gRPC codes, served model names."""
    value = matcher.value
    if value.startswith("$"):  # a dashboard variable
        return
    values = (
        value.split("|") if matcher.op in (promql.MatchOp.Re, promql.MatchOp.NotRe) else [value]
    )
    if matcher.name == "code":
        assert set(values) <= STATUS_CODES, f"{where}: not gRPC status codes: {values}"
    if matcher.name == "model":
        assert set(values) <= MODELS | {".*", ""}, f"{where}: not served models: {values}"


@pytest.mark.parametrize(("variable", "selector", "label"), variable_queries())
def test_dashboard_variables_read_real_labels(
    live_server: LiveServer, variable: str, selector: str, label: str
) -> None:
    (node,), _ = walk(parse(selector))
    assert node.name in live_server.sample_names
    assert label in live_server.labels_of(node.name) | TARGET_LABELS, (variable, label)


# ----------------------------------------------------------------------------- dashboard
def test_dashboard_shows_what_operators_need() -> None:
    """Request rate, errors by code, latency quantiles, queue time, batch size, patches/s."""
    found: dict[str, bool] = dict.fromkeys(
        ("request rate", "errors by code", "latency quantiles", "queue time", "batch size",
         "patches/s"),
        False,
    )  # fmt: skip
    for panel in panels(DASHBOARD["panels"]):
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if not exprs:
            continue
        parsed = [walk(parse(e)) for e in exprs]
        names = {s.name for selectors, _ in parsed for s in selectors}
        grouped = {label for _, groups in parsed for g in groups for label in g}
        quantiles = set(re.findall(r"histogram_quantile\((0\.\d+)", " ".join(exprs)))
        code_filtered = any("code" in e for e in exprs)
        if "rarechange_requests_total" in names and not code_filtered:
            found["request rate"] = True
        if "rarechange_requests_total" in names and "code" in grouped:
            found["errors by code"] = True
        if "rarechange_request_seconds_bucket" in names and len(quantiles) >= 3:
            found["latency quantiles"] = True
        if names & {"rarechange_queue_seconds_bucket", "rarechange_queue_seconds_sum"}:
            found["queue time"] = True
        if (
            "rarechange_batch_size_bucket" in names
            or {
                "rarechange_patches_total",
                "rarechange_batches_total",
            }
            <= names
        ):
            found["batch size"] = True
        if names == {"rarechange_patches_total"}:
            found["patches/s"] = True
    assert all(found.values()), [k for k, v in found.items() if not v]


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(DASHBOARD["panels"])]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels(DASHBOARD["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(?!__)(\w+)", target["expr"]))
            assert used <= variables, (panel["title"], used - variables)


def test_dashboard_ships_as_a_configmap_the_grafana_sidecar_loads(rendered: dict) -> None:
    configmap = find(rendered["monitoring"], "ConfigMap", "rarechange-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = configmap["data"].values()
    assert json.loads(content) == DASHBOARD


# ----------------------------------------------------------------------------- alerts
def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in RULES["spec"]["groups"] for r in g["rules"] if "alert" in r}


def test_alerts_cover_errors_saturation_and_no_ready_replicas(rendered: dict) -> None:
    rules = alerts()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    # error ratio: server-side codes only
    error = rules["RarechangeHighErrorRatio"]["expr"]
    codes = set(re.search(r'code=~"([^"]+)"', error)[1].split("|"))  # type: ignore[index]
    assert codes <= STATUS_CODES and not codes & CLIENT_CODES, codes
    assert "RESOURCE_EXHAUSTED" not in codes, "a full queue has its own alert"
    assert 'code="RESOURCE_EXHAUSTED"' in rules["RarechangeQueueFull"]["expr"]
    # no ready replicas, on the gateway Deployment the overlays create
    deployment = find(rendered["cpu"], "Deployment", "rarechange")["metadata"]["name"]
    assert f'deployment="{deployment}"' in rules["RarechangeNoReadyReplicas"]["expr"]
    hpa = find(rendered["cpu"], "HorizontalPodAutoscaler")["metadata"]["name"]
    assert f'horizontalpodautoscaler="{hpa}"' in rules["RarechangeAutoscalerAtMax"]["expr"]
    # saturation fires only well above every autoscaling target: the HPA had its chance
    expr = parse(rules["RarechangeQueueSaturated"]["expr"])
    assert type(expr).__name__ == "BinaryExpr" and str(expr.op) == ">"
    threshold = expr.rhs.val
    for overlay in ("cpu", "gpu", "triton"):
        hpa = find(rendered[overlay], "HorizontalPodAutoscaler")
        target = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
        seconds = float(target[:-1]) / 1000 if target.endswith("m") else float(target)
        assert threshold >= 2 * seconds, (overlay, threshold, target)


# ----------------------------------------------------------------------------- the adapter
def test_adapter_rule_serves_the_hpa_metric_from_real_counters(
    live_server: LiveServer, rendered: dict
) -> None:
    (rule,) = ADAPTER["rules"]["custom"]
    assert ADAPTER["rules"]["default"] is False
    (series,), _ = walk(parse(rule["seriesQuery"]))
    assert re.fullmatch(rule["name"]["matches"], series.name)
    overrides = rule["resources"]["overrides"]
    assert {label: o["resource"] for label, o in overrides.items()} == {
        "namespace": "namespace",
        "pod": "pod",
    }
    for overlay in ("cpu", "gpu", "triton"):
        hpa = find(rendered[overlay], "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    # what the rule computes, from the two real scrapes around one call: the mean queue time
    # of the requests in between (rate(sum) / rate(count) over the same window)

    def total(samples: list, name: str) -> float:
        return sum(v for n, _, v in samples if n == name)

    count = total(live_server.after, "rarechange_queue_seconds_count") - total(
        live_server.before, "rarechange_queue_seconds_count"
    )
    seconds = total(live_server.after, "rarechange_queue_seconds_sum") - total(
        live_server.before, "rarechange_queue_seconds_sum"
    )
    latency = total(live_server.after, "rarechange_request_seconds_sum") - total(
        live_server.before, "rarechange_request_seconds_sum"
    )
    assert count >= 1, "the call's queueing was counted"
    mean = seconds / max(count, 1e-9)
    assert math.isfinite(mean) and 0 <= mean <= latency
    # before any call the series exist already (a new pod reads 0, not "no data")
    assert "rarechange_queue_seconds_count" in {n for n, _, _ in live_server.before}
