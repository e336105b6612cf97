"""The chart's monitoring installed on the real control plane: `helm install` asks the API
server's discovery whether monitoring.coreos.com/v1 is served.

- Without the Prometheus Operator's CRDs the ServiceMonitor, PodMonitor and PrometheusRule are
  skipped, the install succeeds, its notes name the values that asked for them, and the
  dashboards (plain ConfigMaps) are created.
- With that API served the install creates all three. The Prometheus Operator's own CRDs are
  not vendored here: stand-in CRDs of the same group, version and kinds (their schemas keep
  every field) make discovery list the API, so this checks the chart's detection and that the
  API server stores the objects, not the Prometheus Operator's schemas. The rules' content
  is checked by promtool (tests/unit/deploy/test_chart_monitoring.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cluster import Cluster

from .test_chart import CHART, _suffix, create_namespace, delete_namespaces, install

MONITORING_KINDS = (
    ("ServiceMonitor", "servicemonitors"),
    ("PodMonitor", "podmonitors"),
    ("PrometheusRule", "prometheusrules"),
)
MONITORING_SETS = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.servingMonitor.enabled=true",
    "metrics.rules.enabled=true",
    "metrics.dashboards.enabled=true",
    # No NetworkPolicy here, so no Prometheus peer needs naming.
    "networkPolicy.enabled=false",
)


def standin_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                      "listKind": f"{kind}List"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }  # fmt: skip


def monitoring_objects(cluster: Cluster, namespace: str) -> list[str]:
    """Kinds of the Prometheus Operator's objects in `namespace` (none when the API is not
    served: kubectl cannot even name the kinds)."""
    found = []
    for kind, plural in MONITORING_KINDS:
        result = cluster.kubectl("get", f"{plural}.monitoring.coreos.com", "-n", namespace,
                                 "-o", "json", check=False)  # fmt: skip
        if result.returncode == 0:
            found += [kind for _ in json.loads(result.stdout)["items"]]
    return found


@pytest.fixture
def release_namespace(cluster: Cluster) -> Iterator[str]:
    namespace = create_namespace(cluster, f"kubetune-mon-{_suffix()}")
    yield namespace
    delete_namespaces(cluster, namespace)


def _install(cluster: Cluster, namespace: str) -> Any:
    # Namespaced to its own namespace: no second cluster-wide operator beside test_chart's.
    return install(cluster, namespace, namespace, f"watch.namespaces={{{namespace}}}",
                   *MONITORING_SETS)


def test_without_the_crds_the_monitors_are_skipped_and_the_notes_say_so(
    cluster: Cluster, release_namespace: str
) -> None:
    assert cluster.get("crd", "servicemonitors.monitoring.coreos.com") is None
    release = _install(cluster, release_namespace)
    try:
        assert monitoring_objects(cluster, release_namespace) == []
        notes = release.install_output
        assert ("metrics.serviceMonitor.enabled, metrics.servingMonitor.enabled, "
                "metrics.rules.enabled asked for Prometheus Operator objects") in notes
        assert "monitoring.coreos.com/v1" in notes
        dashboards = json.loads(cluster.kubectl(
            "get", "configmaps", "-n", release_namespace, "-l", "grafana_dashboard=1",
            "-o", "json").stdout)["items"]  # fmt: skip
        assert sorted(cm["metadata"]["name"] for cm in dashboards) == [
            f"{release.name}-dashboard-serving", f"{release.name}-dashboard-training"
        ]
    finally:
        cluster.helm("uninstall", release.name, "-n", release_namespace, "--wait", check=False)


def test_with_the_api_served_the_install_creates_each_monitor(
    cluster: Cluster, release_namespace: str
) -> None:
    crds = [standin_crd(kind, plural) for kind, plural in MONITORING_KINDS]
    cluster.apply(*crds)
    try:
        for crd in crds:
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                            f"crd/{crd['metadata']['name']}")  # fmt: skip
        release = _install(cluster, release_namespace)
        try:
            assert sorted(monitoring_objects(cluster, release_namespace)) == [
                "PodMonitor", "PrometheusRule", "ServiceMonitor"
            ]
            assert "asked for Prometheus Operator objects" not in release.install_output
            stored = cluster.get("prometheusrules.monitoring.coreos.com", release.name,
                                 release_namespace)  # fmt: skip
            assert stored is not None
            source = yaml.safe_load((CHART / "rules" / "alerts.yaml").read_text())
            assert [group["name"] for group in stored["spec"]["groups"]] == [
                group["name"] for group in source["groups"]
            ]
            monitor = cluster.get("podmonitors.monitoring.coreos.com",
                                  f"{release.name}-serving", release_namespace)  # fmt: skip
            assert monitor is not None
            assert monitor["spec"]["namespaceSelector"] == {"matchNames": [release_namespace]}
        finally:
            cluster.helm("uninstall", release.name, "-n", release_namespace, "--wait",
                         check=False)  # fmt: skip
    finally:
        for crd in crds:
            cluster.kubectl("delete", "crd", crd["metadata"]["name"], "--ignore-not-found",
                            check=False)  # fmt: skip
