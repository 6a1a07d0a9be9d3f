"""deploy/observability: the collector and Prometheus configs hang together, and every metric the
Grafana dashboard queries is one a real gateway exports on its /metrics endpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml

from gateway.testing import GatewayThread
from tests.waiting import wait_until

HERE = Path(__file__).resolve().parents[1] / "deploy" / "observability"
COLLECTOR = HERE / "otel-collector.yaml"
PROMETHEUS = HERE / "prometheus.yml"
DASHBOARD = HERE / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Every instrument of gateway/telemetry/stage.py, as the Prometheus exporter names its series: unit
# "s" adds _seconds, counters add _total, curly-brace units ({row}, {request}) and "1" add nothing.
HISTOGRAMS = {
    "tensorgate_request_duration_seconds",
    "tensorgate_backend_duration_seconds",
    "tensorgate_batching_queue_duration_seconds",
    "tensorgate_batch_size",
}
FAMILIES = {
    "tensorgate_requests_total",
    "tensorgate_errors_total",
    *(f"{histogram}_{suffix}" for histogram in HISTOGRAMS for suffix in ("bucket", "count", "sum")),
    "tensorgate_batching_queue_depth",
    "tensorgate_backend_inflight",
    "tensorgate_backend_healthy",
    "tensorgate_routing_decisions_total",
    "tensorgate_drift_statistic",
    "tensorgate_drift_alerts_total",
    # Buckets only: prometheus_client drops _sum and _count of a histogram whose first bound is
    # negative, which drift bin edges often are.
    "tensorgate_drift_observations_bucket",
}
# Names the gateway no longer exports (replaced by the histograms and tensorgate_backend_inflight).
REMOVED = {"tensorgate_batch_size", "tensorgate_batching_queue_delay_seconds", "tensorgate_backend_outstanding"}


def _instrument(series: str) -> str:
    """The metric family a series name belongs to (a histogram's _bucket/_count/_sum → the histogram)."""
    base = re.sub(r"_(bucket|count|sum)$", "", series)
    return base if base in HISTOGRAMS or base == "tensorgate_drift_observations" else series


PROMQL_WORDS = {
    # aggregation and binary-operator keywords (functions are excluded by the "(" that follows them)
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "atan2", "inf", "nan",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges and grouping clauses are removed, that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (also hold $variables)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges: [5m], [$__rate_interval]
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{job=~"$job", x="rate(b)"}[$__rate_interval])))'
            " / on (model) group_left sum without (le) (c_total) > bool 0 or vector(1) offset 5m")
    assert _metric_names_in(expr) == {"a_bucket", "c_total"}


# -- the collector ---------------------------------------------------------------------------


def test_collector_config_structure():
    config = yaml.safe_load(COLLECTOR.read_text())
    otlp = config["receivers"]["otlp"]["protocols"]
    assert otlp["grpc"]["endpoint"].endswith(":4317")
    assert otlp["http"]["endpoint"].endswith(":4318")
    assert config["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    assert "debug" in config["exporters"]
    assert "batch" in config["processors"]
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], extension
    pipelines = service["pipelines"]
    assert set(pipelines) >= {"metrics", "traces"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline {name} uses undefined {kind[:-1]} {component}"
        assert "batch" in pipeline["processors"], name
    assert "otlp" in pipelines["metrics"]["receivers"] and "prometheus" in pipelines["metrics"]["exporters"]
    assert "otlp" in pipelines["traces"]["receivers"] and pipelines["traces"]["exporters"] == ["debug"]
    # Every defined component is used somewhere (a collector warns about, or rejects, the rest).
    for kind in ("receivers", "processors", "exporters"):
        used = {c for p in pipelines.values() for c in p.get(kind, [])}
        assert set(config[kind]) <= used, f"unused {kind}: {set(config[kind]) - used}"


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_structure():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job names"

    def targets(job: str) -> list[str]:
        """host:port of the job's static targets, and name:port of its DNS-discovered ones."""
        static = [t for sc in jobs[job].get("static_configs", []) for t in sc["targets"]]
        by_dns = [f"{name}:{sd['port']}" for sd in jobs[job].get("dns_sd_configs", []) for name in sd["names"]]
        return static + by_dns

    assert "tensorgate:9464" in targets("tensorgate")
    assert any(t.endswith(":8002") for t in targets("triton"))
    collector = [j for j in jobs if any(t.endswith(":8889") for t in targets(j))]
    assert collector, "no job scrapes the collector's Prometheus exporter (8889)"
    assert not jobs[collector[0]].get("honor_labels"), "collector series must not take over job=tensorgate"


@pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK), reason="promtool not installed")
def test_promtool_check_config():
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard ---------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            out.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    return out


def test_dashboard_structure():
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"duplicate refIds in {panel['title']!r}: {refs}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    exprs = " ".join(e for _, e in _exprs(dashboard))
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, le) (rate(tensorgate_request_duration_seconds_bucket" in exprs
    assert "sum by (model) (rate(tensorgate_requests_total" in exprs
    assert "rpc_response_status_code" in exprs
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, le) (rate(tensorgate_batch_size_bucket" in exprs
    for quantile in ("0.5", "0.9", "0.99"):
        assert (f"histogram_quantile({quantile}, sum by (model, le) "
                "(rate(tensorgate_batching_queue_duration_seconds_bucket") in exprs
        assert (f"histogram_quantile({quantile}, sum by (pool, backend, le) "
                "(rate(tensorgate_backend_duration_seconds_bucket") in exprs
    assert "sum by (pool, reason) (rate(tensorgate_routing_decisions_total" in exprs
    for name in REMOVED:
        assert not re.search(rf"\b{name}\b(?!_)", exprs), f"dashboard still queries the removed {name}"


@pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK), reason="promtool not installed")
def test_dashboard_promql_parses(tmp_path):
    """promtool parses every expression (as recording rules), Grafana's variables filled in."""
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "30s"}
    rules = []
    for i, (_, expr) in enumerate(_exprs(_dashboard())):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def exported_names(tritons) -> set[str]:
    """Series names on a real gateway's /metrics after traffic that makes every instrument report:
    requests (OK and an error) to batched models (max_batch_size > 0, so the batching stage runs by
    default: batch sizes, queue time and depth), routing decisions, and a drift window shifted enough
    to raise alerts (drift statistics and the observations histogram)."""
    port = _free_port()
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"prometheus_port": port, "prometheus_host": "127.0.0.1"},
        "drift": {"models": {"simple_scale": {
            "inputs": ["INPUT0"], "window_rows": 64, "sub_windows": 1, "consecutive": 1,
            "reference": {"learn_rows": 64},
        }}},
    }
    rng = np.random.default_rng(0)
    with GatewayThread(config) as thread:
        client = triton_grpc.InferenceServerClient(thread.address)
        try:
            for shift in [0.0] * 4 + [5.0] * 4:  # 64 rows learn the reference, 64 shifted rows drift
                tensor = triton_grpc.InferInput("INPUT0", [16, 16], "FP32")
                tensor.set_data_from_numpy((rng.standard_normal((16, 16)) + shift).astype(np.float32))
                client.infer("simple_scale", [tensor], client_timeout=10)
            data = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
            data.set_data_from_numpy(np.ones((1, 16), np.float32))
            mode = triton_grpc.InferInput("MODE", [1, 1], "INT32")
            mode.set_data_from_numpy(np.ones((1, 1), np.int32))  # MODE 1: an INTERNAL error response
            with pytest.raises(triton_grpc.InferenceServerException):
                client.infer("fail_on_demand", [data, mode], client_timeout=10)
        finally:
            client.close()

        def exported() -> set[str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                body = response.read().decode()
            return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)", body, re.MULTILINE)}

        names = wait_until(exported, "every instrument on /metrics", 20, step=0.25,
                           accept=lambda names: FAMILIES <= names, raise_on_timeout=False)
        assert not thread.loop_errors
    return names


def test_gateway_exports_every_instrument(exported_names):
    assert FAMILIES <= exported_names, sorted(FAMILIES - exported_names)


def test_every_dashboard_metric_is_exported(exported_names):
    used = {}
    for where, expr in _exprs(_dashboard()):
        names = _metric_names_in(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            used.setdefault(name, []).append(where)
    unknown = {name: wheres for name, wheres in used.items() if name not in exported_names}
    assert not unknown, f"dashboard queries metrics the gateway does not export: {unknown}"
    # The dashboard covers every instrument (a histogram through any of its series).
    uncovered = {_instrument(name) for name in FAMILIES} - {_instrument(name) for name in used}
    assert not uncovered, f"instruments without a dashboard panel: {sorted(uncovered)}"


def test_removed_metrics_are_gone(exported_names):
    assert not REMOVED & exported_names, sorted(REMOVED & exported_names)
