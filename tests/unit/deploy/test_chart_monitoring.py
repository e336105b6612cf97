"""The chart's monitoring: the operator's ServiceMonitor, the inference pods' PodMonitor, the
PrometheusRule and the Grafana dashboards.

- The alert rules the chart ships (rules/alerts.yaml rendered into the PrometheusRule) pass
  `promtool check rules` and the unit cases in monitoring/alerts_test.yaml (`promtool test
  rules`): each alert fires on written series and stays silent on healthy ones.
- Every dashboard panel's query parses (promtool checks them as recording rules).
- Rules and panels name only metrics the operator and the server define.
- With the Prometheus Operator's API (`--api-versions monitoring.coreos.com/v1`) the monitors
  render and select what the operator really builds; without it they are skipped and
  `helm lint` is clean either way.

promtool is Debian's `prometheus` package: `make setup` installs it (hack/install-promtool.sh,
root and apt-get). Without it these tests FAIL and say how to get it: a skip would let the
rules ship untested. helm is the tier's (test_chart.py skips without it, as there).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from kubetune.api import FineTuneJobSpec
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_deployment
from kubetune.operator.metrics import OperatorMetrics
from kubetune_trainer.serve.metrics import Metrics as ServerMetrics
from tests.monitoring import as_promql, dashboards, panel_queries, variable_queries
from tests.unit.deploy.conftest import PROMTOOL_ENV, find_promtool
from tests.unit.deploy.test_chart import (
    CHART_DIR,
    KUBE_VERSION,
    MONITORING_API,
    NAMESPACE,
    PROMETHEUS_PEER,
    RELEASE,
    by_kind,
    one,
    run_helm,
)
from tests.unit.deploy.test_chart_networkpolicy import selects
from tests.unit.operator_fixtures import CONFIG, body, spec_dict

ALERT_CASES = Path(__file__).parent / "monitoring" / "alerts_test.yaml"
ALL_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "servingMonitor": {"enabled": True},
        "rules": {"enabled": True},
        "dashboards": {"enabled": True},
    },
    "networkPolicy": {"metricsFrom": [PROMETHEUS_PEER]},
}
ALERTS = {
    "KubeTuneJobFailed",
    "KubeTuneJobStalled",
    "KubeTuneGateRefusedModel",
    "KubeTuneServerErrorRatioHigh",
    "KubeTuneServerTimeToFirstTokenHigh",
    "KubeTuneServerRequestsWaiting",
}


def test_a_missing_promtool_fails_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PROMTOOL_ENV, raising=False)
    monkeypatch.setenv("PATH", "")

    with pytest.raises(pytest.fail.Exception, match="make setup") as failure:
        find_promtool()
    assert "apt-get" in str(failure.value)


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def with_monitoring_api(helm: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart rendered for a cluster that serves the Prometheus Operator's API."""
    return render(helm, values, api_versions=(MONITORING_API,))


def render(
    helm: str, values: dict[str, Any], api_versions: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART_DIR), "-n", NAMESPACE, "--kube-version", KUBE_VERSION]
    for version in api_versions:
        args += ["--api-versions", version]
    result = subprocess.run(
        [helm, *args, "-f", "-"], input=yaml.safe_dump(values), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def shipped_rules(chart_helm: str) -> dict[str, Any]:
    """The `spec` of the PrometheusRule the chart renders with its default bounds."""
    rule = one(with_monitoring_api(chart_helm, ALL_ON), "PrometheusRule")
    return dict(rule["spec"])


@pytest.fixture
def rules_file(shipped_rules: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "kubetune-rules.yaml"
    path.write_text(yaml.safe_dump(shipped_rules, sort_keys=False))
    return path


def alert_rules(rules: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["groups"]:
        yield from (rule for rule in group["rules"] if "alert" in rule)


# --------------------------------------------------------------------------- the rules


def test_the_prometheus_rule_is_the_rules_file_with_its_bounds_filled_in(
    shipped_rules: dict[str, Any],
) -> None:
    source = (CHART_DIR / "rules" / "alerts.yaml").read_text()
    filled = {"${JOB_STALLED_SECONDS}": "900", "${JOB_STALLED_MINUTES}": "15",
              "${SERVER_ERROR_RATIO}": "0.05", "${TTFT_P95_SECONDS}": "5",
              "${REQUESTS_WAITING}": "0", "${REQUESTS_WAITING_MINUTES}": "5"}  # fmt: skip
    for placeholder, value in filled.items():
        assert placeholder in source
        source = source.replace(placeholder, value)

    assert shipped_rules == {"groups": yaml.safe_load(source)["groups"]}
    rules = list(alert_rules(shipped_rules))
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, rule["alert"]
        # The runbook is steps to follow, static text (the unit cases copy it).
        assert "kubectl" in annotations["runbook"] or "spec." in annotations["runbook"]
        assert "{{" not in annotations["runbook"], rule["alert"]


def test_the_bounds_come_from_values(chart_helm: str) -> None:
    values = {"metrics": {"rules": {
        "enabled": True, "jobStalledMinutes": 30, "serverErrorRatio": 0.2,
        "timeToFirstTokenP95Seconds": 2.5, "requestsWaiting": 4, "requestsWaitingMinutes": 7,
    }}}  # fmt: skip
    spec = one(with_monitoring_api(chart_helm, values), "PrometheusRule")["spec"]
    rules = {rule["alert"]: rule for rule in alert_rules(spec)}

    assert "> 1800" in rules["KubeTuneJobStalled"]["expr"]
    assert "30 minutes" in rules["KubeTuneJobStalled"]["annotations"]["summary"]
    assert ") > 0.2" in rules["KubeTuneServerErrorRatioHigh"]["expr"]
    assert ") > 2.5" in rules["KubeTuneServerTimeToFirstTokenHigh"]["expr"]
    assert rules["KubeTuneServerRequestsWaiting"]["expr"].rstrip().endswith("> 4")
    assert rules["KubeTuneServerRequestsWaiting"]["for"] == "7m"


def test_promtool_check_rules_accepts_the_shipped_rules(promtool: str, rules_file: Path) -> None:
    result = run_promtool(promtool, "check", "rules", str(rules_file))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_fires_on_its_series_and_is_silent_when_healthy(
    promtool: str, rules_file: Path, shipped_rules: dict[str, Any]
) -> None:
    cases = yaml.safe_load(ALERT_CASES.read_text())
    runbooks = {rule["alert"]: rule["annotations"]["runbook"]
                for rule in alert_rules(shipped_rules)}
    fired: set[str] = set()
    silent: set[str] = set()
    for case in cases["tests"]:
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            (fired if check["exp_alerts"] else silent).add(name)
            for alert in check["exp_alerts"]:
                alert["exp_annotations"]["runbook"] = runbooks[name]
    assert fired == ALERTS, f"alerts no case fires: {ALERTS - fired}"
    assert silent == ALERTS, f"alerts no healthy case checks: {ALERTS - silent}"
    cases["rule_files"] = [rules_file.name]
    case_file = rules_file.parent / "alerts_test.yaml"
    case_file.write_text(yaml.safe_dump(cases, sort_keys=False))

    result = run_promtool(promtool, "test", "rules", str(case_file))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_when_an_alert_does_not_fire(
    promtool: str, rules_file: Path, shipped_rules: dict[str, Any]
) -> None:
    """The harness can fail: the stalled job's case against a rule with a bound of a day."""
    rules = json.loads(json.dumps(shipped_rules))
    for rule in alert_rules(rules):
        if rule["alert"] == "KubeTuneJobStalled":
            rule["expr"] = rule["expr"].replace("> 900", "> 86400")
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    cases = yaml.safe_load(ALERT_CASES.read_text())
    cases["tests"] = [case for case in cases["tests"] if case["name"] == "job-stalled-fires"]
    cases["rule_files"] = [rules_file.name]
    case_file = rules_file.parent / "alerts_test.yaml"
    case_file.write_text(yaml.safe_dump(cases, sort_keys=False))

    result = run_promtool(promtool, "test", "rules", str(case_file))

    assert result.returncode != 0
    assert "KubeTuneJobStalled" in result.stdout + result.stderr


# --------------------------------------------------------------------------- dashboards


def test_the_dashboards_are_the_two_views(chart_helm: str) -> None:
    found = dashboards()
    assert set(found) == {"training.json", "serving.json"}
    titles = {name: {p["title"] for p in d["panels"]} for name, d in found.items()}
    assert {"Training loss", "Validation loss", "Tokens per second", "Time to finish",
            "Phase per job"} <= titles["training.json"]  # fmt: skip
    assert {"Requests by status", "Time to first token", "Inter-token latency", "KV-cache use",
            "Generated tokens per second, by model and adapter",
            } <= titles["serving.json"]  # fmt: skip
    for name, dashboard in found.items():
        assert dashboard["uid"] == f"kubetune-{name.removesuffix('.json')}"
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: two panels share an id"
        # Every panel reads the dashboard's datasource variable, not a fixed Prometheus.
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_query_parses(promtool: str, tmp_path: Path) -> None:
    rules = [
        {"record": f"kubetune:panel_{index}", "expr": as_promql(expr)}
        for index, (_, expr) in enumerate(
            query for dashboard in dashboards().values() for query in panel_queries(dashboard)
        )
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))

    result = run_promtool(promtool, "check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_refuses_a_panel_query_that_does_not_parse(
    promtool: str, tmp_path: Path
) -> None:
    path = tmp_path / "panels.yaml"
    broken = as_promql('sum by (job (rate(kubetune_requests_total{job=~"$job"}[$__rate_interval]))')
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": [
        {"record": "kubetune:panel_0", "expr": broken}]}]}))  # fmt: skip

    assert run_promtool(promtool, "check", "rules", str(path)).returncode != 0


# --------------------------------------------------------------------------- metric names


def series_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry exposes, labelled families without children included:
    `_total` (and `_created`) of counters, `_bucket`, `_sum`, `_count` of histograms."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                "_created"), "summary": ("_sum", "_count", "_created")}  # fmt: skip
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def defined_metrics() -> set[str]:
    return series_names(OperatorMetrics().registry) | series_names(ServerMetrics().registry)


def used_metrics(expr: str) -> set[str]:
    """KubeTune metric names in a query (every one starts `kubetune_`; recording rules'
    `kubetune:` names are not metrics)."""
    return set(re.findall(r"\bkubetune_[A-Za-z0-9_]+", expr))


def test_the_name_collection_sees_both_planes() -> None:
    defined = defined_metrics()
    assert {"kubetune_reconciles_total", "kubetune_finetunejobs", "kubetune_job_gate_passed",
            "kubetune_time_to_first_token_seconds_bucket", "kubetune_requests_waiting",
            "kubetune_generated_tokens_total"} <= defined  # fmt: skip
    assert "kubetune_reconciles" not in defined  # a counter's series is `_total`


def test_rules_and_panels_name_only_metrics_that_exist(shipped_rules: dict[str, Any]) -> None:
    defined = defined_metrics()
    queries = [(rule["alert"], rule["expr"]) for rule in alert_rules(shipped_rules)]
    for name, dashboard in dashboards().items():
        queries += [(f"{name}: {title}", expr) for title, expr in panel_queries(dashboard)]
        queries += [(f"{name}: variable", query) for query in variable_queries(dashboard)]

    unknown = {
        (where, metric)
        for where, expr in queries
        for metric in used_metrics(expr)
        if metric not in defined
    }
    assert unknown == set(), f"queries name metrics nobody defines: {sorted(unknown)}"
    assert all(used_metrics(expr) for _, expr in queries), "a query names no KubeTune metric"


def test_an_unknown_metric_is_caught() -> None:
    assert used_metrics("rate(kubetune_request_total[5m])") - defined_metrics() == {
        "kubetune_request_total"
    }


# --------------------------------------------------------------------------- rendering


def test_everything_is_off_by_default(chart_helm: str) -> None:
    docs = with_monitoring_api(chart_helm, {})
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert by_kind(docs, "ConfigMap") == []


def test_without_the_prometheus_operator_api_its_objects_are_skipped(chart_helm: str) -> None:
    docs = render(chart_helm, ALL_ON)
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    # Dashboards are ConfigMaps: they need no CRD.
    assert len(by_kind(docs, "ConfigMap")) == 2


def test_with_the_prometheus_operator_api_each_value_renders_its_object(chart_helm: str) -> None:
    docs = with_monitoring_api(chart_helm, ALL_ON)
    assert [doc["metadata"]["name"] for doc in by_kind(docs, "ServiceMonitor")] == [
        "kt-kubetune-operator"
    ]
    assert [doc["metadata"]["name"] for doc in by_kind(docs, "PodMonitor")] == [
        "kt-kubetune-serving"
    ]
    assert [doc["metadata"]["name"] for doc in by_kind(docs, "PrometheusRule")] == ["kt-kubetune"]
    for doc in docs:
        if doc["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            assert doc["apiVersion"] == MONITORING_API
            assert doc["metadata"]["namespace"] == NAMESPACE
    for name in ("servingMonitor", "rules"):
        values = {**ALL_ON, "metrics": {name: {"enabled": True}}}
        kinds = {doc["kind"] for doc in with_monitoring_api(chart_helm, values)}
        assert len(kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}) == 1, name


@pytest.mark.parametrize(
    "values", [{}, ALL_ON, {**ALL_ON, "watch": {"namespaces": ["team-a"]}}],
    ids=["defaults", "all-monitoring", "all-monitoring-namespaced"],
)
def test_helm_lint_is_clean(chart_helm: str, values: dict[str, Any], tmp_path: Path) -> None:
    """`helm lint` cannot be told an API exists: the monitors are skipped, the lint clean."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))

    result = run_helm(chart_helm, "lint", "--strict", str(CHART_DIR), "-f", str(values_file),
                      "--kube-version", KUBE_VERSION)  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_the_operator_service_monitor_keeps_the_job_labels(chart_helm: str) -> None:
    monitor = one(with_monitoring_api(chart_helm, ALL_ON), "ServiceMonitor")
    # The job gauges' own `namespace` and `job` (the FineTuneJob's) win over the scrape's.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_the_pod_monitor_selects_the_inference_pods_the_operator_builds(chart_helm: str) -> None:
    owner = Owner.from_body(body())
    deployment = serving_deployment(
        owner, 1, None, FineTuneJobSpec.model_validate(spec_dict()), CONFIG
    )
    template = deployment["spec"]["template"]
    monitor = one(with_monitoring_api(chart_helm, ALL_ON), "PodMonitor")["spec"]

    assert selects(monitor["selector"], template["metadata"]["labels"])
    ports = [port["name"] for container in template["spec"]["containers"]
             for port in container.get("ports", [])]  # fmt: skip
    assert [endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]] == ["http"]
    assert "http" in ports
    assert monitor["podMetricsEndpoints"][0]["path"] == "/metrics"
    # `job` on every server series is the FineTuneJob's name, as on the operator's gauges.
    assert template["metadata"]["labels"][monitor["jobLabel"]] == owner.name
    # Not the trainer's or exporter's pods (no /metrics there).
    assert not selects(monitor["selector"], {**template["metadata"]["labels"],
                                             "app.kubernetes.io/component": "trainer"})


@pytest.mark.parametrize(
    ("values", "selector"),
    [
        ({}, {"any": True}),
        ({"watch": {"namespaces": ["team-a", "team-b"]}}, {"matchNames": ["team-a", "team-b"]}),
        ({"watch": {"namespaces": ["team-a"]},
          "metrics": {"servingMonitor": {"enabled": True, "namespaces": ["serving"]}}},
         {"matchNames": ["serving"]}),
    ],
    ids=["cluster-wide", "watched", "listed"],
)
def test_the_pod_monitor_looks_where_inference_pods_run(
    chart_helm: str, values: dict[str, Any], selector: dict[str, Any]
) -> None:
    merged = {**ALL_ON, **values,
              "metrics": {**ALL_ON["metrics"], **values.get("metrics", {})}}  # fmt: skip
    monitor = one(with_monitoring_api(chart_helm, merged), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == selector


def test_dashboards_are_config_maps_for_grafanas_sidecar(chart_helm: str) -> None:
    config_maps = by_kind(render(chart_helm, ALL_ON), "ConfigMap")
    maps = {doc["metadata"]["name"]: doc for doc in config_maps}

    assert set(maps) == {"kt-kubetune-dashboard-serving", "kt-kubetune-dashboard-training"}
    for config_map in maps.values():
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == NAMESPACE
        (key, text), = config_map["data"].items()
        assert json.loads(text) == dashboards()[key]
    custom = {**ALL_ON, "metrics": {"dashboards": {
        "enabled": True, "namespace": "grafana", "sidecarLabel": "dashboards",
        "sidecarLabelValue": "kubetune", "annotations": {"grafana_folder": "KubeTune"}}}}
    for config_map in by_kind(render(chart_helm, custom), "ConfigMap"):
        assert config_map["metadata"]["namespace"] == "grafana"
        assert config_map["metadata"]["labels"]["dashboards"] == "kubetune"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "KubeTune"}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"metrics": {"servingMonitor": {"enabled": True}},
          "serving": {"networkPolicy": {"enabled": True}}},
         ["metrics.servingMonitor.enabled", "networkPolicy.metricsFrom",
          "serving.networkPolicy.enabled"]),
        ({"metrics": {"servingMonitor": {"enabled": True, "interval": "15s",
                                         "scrapeTimeout": "20s"}}},
         ["metrics.servingMonitor.scrapeTimeout", '"20s"', "metrics.servingMonitor.interval"]),
        ({"metrics": {"rules": {"serverErrorRatio": 5}}}, ["/metrics/rules/serverErrorRatio"]),
        ({"metrics": {"rules": {"jobStalledMinutes": 0}}}, ["/metrics/rules/jobStalledMinutes"]),
        ({"metrics": {"dashboards": {"sidecarLabel": "not a label"}}},
         ["/metrics/dashboards/sidecarLabel"]),
        ({"metrics": {"servingMonitor": {"labels": {"app.kubernetes.io/name": "x"}}}},
         ["/metrics/servingMonitor/labels/app.kubernetes.io~1name"]),
    ],
    ids=["scrapes-behind-the-serving-policy", "timeout-over-interval", "ratio-above-one",
         "stalled-after-zero-minutes", "bad-sidecar-label", "chart-label-overridden"],
)
def test_wrong_monitoring_values_are_refused_naming_them(
    chart_helm: str, values: dict[str, Any], named: list[str]
) -> None:
    result = subprocess.run(
        [chart_helm, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE, "--kube-version",
         KUBE_VERSION, "--api-versions", MONITORING_API, "-f", "-"],
        input=yaml.safe_dump(values), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0, f"rendered {values}"
    assert [name for name in named if name not in result.stderr] == [], result.stderr
