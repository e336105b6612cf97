"""hack/prometheus.py's translation of the chart's ServiceMonitor and PodMonitor into the
Prometheus scrape configs the Prometheus Operator would generate, on the monitors the chart
really renders (`helm template --api-versions monitoring.coreos.com/v1`).

The relabelling is checked by applying it as Prometheus does (`relabel` below: anchored
regexes, `;`-joined source labels, `$1` replacements) to the labels Kubernetes service
discovery gives the targets the operator and the chart really create, and the whole file by
`promtool check config`. The real-node tier then scrapes with it (tests/realnode).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTuneJobSpec
from kubetune.builders.meta import Owner
from kubetune.builders.serving import serving_deployment
from tests.unit.deploy.test_chart import NAMESPACE, one
from tests.unit.deploy.test_chart_monitoring import ALL_ON, run_promtool, with_monitoring_api
from tests.unit.operator_fixtures import CONFIG, body, spec_dict

HACK_DIR = Path(__file__).resolve().parents[3] / "hack"
if str(HACK_DIR) not in sys.path:
    sys.path.insert(0, str(HACK_DIR))

import prometheus  # noqa: E402  (hack/ is not a package)

KUBECONFIG = Path("/tmp/tier/admin.kubeconfig")
WATCHED = {**ALL_ON, "watch": {"namespaces": ["team-a"]}}


def relabel(
    labels: Mapping[str, str], configs: Sequence[Mapping[str, Any]]
) -> dict[str, str] | None:
    """Prometheus' relabelling of one target (the actions the translation uses): None when a
    keep or drop discards it, else its labels after every replace (`__` ones dropped)."""
    result = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(
            result.get(name, "") for name in config.get("source_labels", [])
        )
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", config.get("replacement", "$1"))
            replacement = match.expand(template)
            if replacement:
                result[config["target_label"]] = replacement
            else:
                result.pop(config["target_label"], None)
    return {name: value for name, value in result.items() if not name.startswith("__")}


def running_pod(template: Mapping[str, Any], name: str, namespace: str, ip: str) -> dict[str, Any]:
    """A pod of a Deployment's template as the API server lists it once it runs."""
    return {
        "metadata": {**template["metadata"], "name": name, "namespace": namespace},
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


def scraped(
    groups: Sequence[Mapping[str, Any]], configs: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """The labels of every discovered target the job's relabelling keeps."""
    kept = []
    for group in groups:
        for address in group["targets"]:
            labels = {**group["labels"], "__address__": address, "job": "pool"}
            after = relabel(labels, configs)
            if after is not None:
                kept.append(after)
    return kept


@pytest.fixture(scope="module")
def rendered(chart_helm: str) -> list[dict[str, Any]]:
    return with_monitoring_api(chart_helm, WATCHED)


@pytest.fixture(scope="module")
def jobs(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in prometheus.scrape_configs(rendered, KUBECONFIG)}


def test_each_monitor_endpoint_is_one_scrape_job(jobs: dict[str, dict[str, Any]]) -> None:
    assert set(jobs) == {
        f"serviceMonitor/{NAMESPACE}/kt-kubetune-operator/0",
        f"podMonitor/{NAMESPACE}/kt-kubetune-serving/0",
    }
    operator = jobs[f"serviceMonitor/{NAMESPACE}/kt-kubetune-operator/0"]
    assert operator["kubernetes_sd_configs"] == [{
        "role": "endpoints", "kubeconfig_file": str(KUBECONFIG),
        "namespaces": {"names": [NAMESPACE]},
    }]  # fmt: skip
    assert operator["honor_labels"] is True
    assert (operator["metrics_path"], operator["scrape_interval"], operator["scrape_timeout"]) == (
        "/metrics", "30s", "10s")  # fmt: skip
    servers = jobs[f"podMonitor/{NAMESPACE}/kt-kubetune-serving/0"]
    assert servers["kubernetes_sd_configs"] == [{
        "role": "pod", "kubeconfig_file": str(KUBECONFIG), "namespaces": {"names": ["team-a"]},
    }]  # fmt: skip
    assert servers["honor_labels"] is False


def test_the_operator_job_scrapes_the_charts_service_and_names_it(
    rendered: list[dict[str, Any]], jobs: dict[str, dict[str, Any]]
) -> None:
    service = one(rendered, "Service", "kt-kubetune-operator")
    template = one(rendered, "Deployment", "kt-kubetune-operator")["spec"]["template"]
    operator = running_pod(template, "op-1", NAMESPACE, "10.0.0.7")
    finished = {**running_pod(template, "op-0", NAMESPACE, "10.0.0.6"),
                "status": {"phase": "Succeeded", "podIP": "10.0.0.6"}}  # fmt: skip
    [port] = service["spec"]["ports"]
    endpoints = {
        "metadata": {"name": "kt-kubetune-operator", "namespace": NAMESPACE},
        "subsets": [{
            "addresses": [{"ip": "10.0.0.7", "targetRef": {"kind": "Pod", "name": "op-1"}}],
            "notReadyAddresses": [{"ip": "10.0.0.6", "targetRef": {"kind": "Pod",
                                                                   "name": "op-0"}}],
            "ports": [{"name": port["name"], "port": 8080, "protocol": "TCP"},
                      {"name": "health", "port": 8081, "protocol": "TCP"}],
        }],
    }  # fmt: skip
    # Another Service in the namespace, with the chart's labels but another component.
    webhook = {"metadata": {**service["metadata"], "name": "kt-webhook",
                            "labels": {**service["metadata"]["labels"],
                                       "app.kubernetes.io/component": "webhook"}}}  # fmt: skip
    webhook_endpoints = {**endpoints, "metadata": {"name": "kt-webhook", "namespace": NAMESPACE}}
    groups = prometheus.endpoint_groups(
        [endpoints, webhook_endpoints], [service, webhook], [operator, finished]
    )
    configs = jobs[f"serviceMonitor/{NAMESPACE}/kt-kubetune-operator/0"]["relabel_configs"]

    # One target: the running pod's `http` port of the chart's Service (not its other port,
    # not the finished pod, not the other Service).
    assert scraped(groups, configs) == [{
        "job": "kt-kubetune-operator", "namespace": NAMESPACE, "service": "kt-kubetune-operator",
        "pod": "op-1", "container": "operator", "endpoint": "http",
    }]  # fmt: skip


def test_the_server_job_scrapes_inference_pods_and_labels_them_by_finetunejob(
    jobs: dict[str, dict[str, Any]],
) -> None:
    owner = Owner.from_body(body())
    template = serving_deployment(
        owner, 1, None, FineTuneJobSpec.model_validate(spec_dict()), CONFIG
    )["spec"]["template"]
    server = running_pod(template, "srv-1", "team-a", "10.0.1.9")
    trainer_template = {
        **template,
        "metadata": {
            **template["metadata"],
            "labels": {**template["metadata"]["labels"], "app.kubernetes.io/component": "trainer"},
        },
    }
    trainer = running_pod(trainer_template, "train-1", "team-a", "10.0.1.10")
    unnamed_template = {
        **template,
        "metadata": {
            **template["metadata"],
            "labels": {
                k: v for k, v in template["metadata"]["labels"].items() if k != "kubetune.io/job"
            },
        },
    }
    unnamed = running_pod(unnamed_template, "srv-2", "team-a", "10.0.1.11")
    not_yet = {**running_pod(template, "srv-3", "team-a", ""), "status": {"phase": "Pending"}}
    [container] = [c for c in template["spec"]["containers"] if c.get("ports")]
    configs = jobs[f"podMonitor/{NAMESPACE}/kt-kubetune-serving/0"]["relabel_configs"]

    targets = scraped(prometheus.pod_groups([server, trainer, unnamed, not_yet]), configs)

    # `job` is the FineTuneJob's name (the pod's kubetune.io/job), else the PodMonitor's own
    # (as the Operator does); the trainer pod and the pod without an IP are not scraped.
    assert targets == [
        {"job": owner.name, "namespace": "team-a", "pod": "srv-1",
         "container": container["name"], "endpoint": "http"},
        {"job": f"{NAMESPACE}/kt-kubetune-serving", "namespace": "team-a", "pod": "srv-2",
         "container": container["name"], "endpoint": "http"},
    ]  # fmt: skip
    assert [p["name"] for p in container["ports"]] == ["http"]


def test_a_cluster_wide_pod_monitor_discovers_every_namespace(chart_helm: str) -> None:
    jobs = prometheus.scrape_configs(with_monitoring_api(chart_helm, ALL_ON), KUBECONFIG)
    [servers] = [job for job in jobs if job["job_name"].startswith("podMonitor/")]
    assert "namespaces" not in servers["kubernetes_sd_configs"][0]


def test_a_monitor_without_a_namespace_selector_looks_in_its_own(
    rendered: list[dict[str, Any]],
) -> None:
    monitor = copy.deepcopy(one(rendered, "PodMonitor"))
    del monitor["spec"]["namespaceSelector"]
    [job] = prometheus.scrape_configs([monitor], KUBECONFIG)
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"names": [NAMESPACE]}


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(scheme="https"),
         "ServiceMonitor kt-kubetune-operator.spec.endpoints[0].scheme"),
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(relabelings=[]),
         "ServiceMonitor kt-kubetune-operator.spec.endpoints[0].relabelings"),
        ("ServiceMonitor", lambda m: m["spec"].update(jobLabel="app"),
         "ServiceMonitor kt-kubetune-operator.spec.jobLabel"),
        ("PodMonitor", lambda m: m["spec"]["selector"].update(matchExpressions=[]),
         "PodMonitor kt-kubetune-serving.spec.selector.matchExpressions"),
        ("PodMonitor", lambda m: m["spec"]["podMetricsEndpoints"][0].update(tlsConfig={}),
         "PodMonitor kt-kubetune-serving.spec.podMetricsEndpoints[0].tlsConfig"),
        ("PodMonitor", lambda m: m["spec"].update(sampleLimit=10),
         "PodMonitor kt-kubetune-serving.spec.sampleLimit"),
        ("PodMonitor", lambda m: m.update(apiVersion="monitoring.coreos.com/v1alpha1"),
         "PodMonitor kt-kubetune-serving.apiVersion"),
    ],
    ids=["scheme", "relabelings", "service-job-label", "match-expressions", "tls", "sample-limit",
         "api-version"],
)  # fmt: skip
def test_a_field_the_translation_does_not_know_is_refused_naming_it(
    rendered: list[dict[str, Any]], kind: str, change: Any, named: str
) -> None:
    monitor = copy.deepcopy(one(rendered, kind))
    change(monitor)

    with pytest.raises(prometheus.UnsupportedMonitorField) as refused:
        prometheus.scrape_configs([monitor], KUBECONFIG)
    assert named in str(refused.value)


def test_promtool_accepts_the_configuration_with_the_charts_rules(
    promtool: str, rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus.rule_groups(rendered)))
    kubeconfig = tmp_path / "admin.kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    path = tmp_path / "prometheus.yml"
    scrape = prometheus.served_by(
        prometheus.scrape_configs(rendered, kubeconfig), "http://127.0.0.1:9"
    )
    config = prometheus.config(scrape, [rules], "2s")
    path.write_text(yaml.safe_dump(config))

    result = run_promtool(promtool, "check", "config", str(path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout, result.stdout
    assert [group["name"] for group in prometheus.rule_groups(rendered)["groups"]] == [
        group["name"] for group in one(rendered, "PrometheusRule")["spec"]["groups"]
    ]


def test_debians_prometheus_gets_the_same_discovery_over_http(
    jobs: dict[str, dict[str, Any]],
) -> None:
    served = {
        job["job_name"]: job
        for job in prometheus.served_by(list(jobs.values()), "http://127.0.0.1:9")
    }
    for name, job in jobs.items():
        [sd] = job["kubernetes_sd_configs"]
        [http_sd] = served[name]["http_sd_configs"]
        assert "kubernetes_sd_configs" not in served[name]
        query = f"role={sd['role']}&namespaces=" + ",".join(sd["namespaces"]["names"])
        assert http_sd["url"] == f"http://127.0.0.1:9/targets?{query}".replace(",", "%2C")
        # Everything else, the relabelling above all, is the translation's.
        assert {k: v for k, v in served[name].items() if k != "http_sd_configs"} == {
            k: v for k, v in job.items() if k != "kubernetes_sd_configs"}  # fmt: skip
