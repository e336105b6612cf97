"""The chart's NetworkPolicy: the operator's progress port admits KubeTune's trainer pods
(and `networkPolicy.metricsFrom`), nothing else. Rendered with `helm template`, like
test_chart.py (skipped with the reason when the helm binary is not built).

The trainer pod checked against the policy's selectors is the one the operator really
builds (`builders.training.training_job`), so a label renamed in the builders fails here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders.export import export_job
from kubetune.builders.meta import Owner, training_hash
from kubetune.builders.serving import serving_deployment
from kubetune.builders.training import training_job
from tests.unit.deploy.test_chart import helm, one, render  # noqa: F401  (helm: fixture)
from tests.unit.operator_fixtures import CONFIG, body, spec_dict


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches `labels` (the API server's rules). Pure."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
    return True


def _pod_labels(component: str) -> dict[str, str]:
    owner = Owner.from_body(body())
    spec = FineTuneJobSpec.model_validate(spec_dict())
    manifest = {
        "trainer": lambda: training_job(owner, 1, spec, CONFIG, training_hash(spec)),
        "exporter": lambda: export_job(owner, 1, spec, CONFIG),
        "server": lambda: serving_deployment(owner, 1, None, spec, CONFIG),
    }[component]()
    return dict(manifest["spec"]["template"]["metadata"]["labels"])


def _admitted(policy: dict[str, Any], labels: Mapping[str, str], namespace: str, port: int) -> bool:
    """Whether a pod with `labels` in `namespace` may reach `port` of the selected pods."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule["from"]:
            if "namespaceSelector" in peer and not selects(
                peer["namespaceSelector"], namespace_labels
            ):
                continue
            if "podSelector" in peer and not selects(peer["podSelector"], labels):
                continue
            if "namespaceSelector" not in peer and namespace != "kubetune-system":
                continue  # a podSelector alone means the policy's own namespace
            return True
    return False


def test_only_trainer_pods_reach_the_progress_port_by_default(helm: str) -> None:  # noqa: F811
    docs = render(helm)
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert selects(policy["spec"]["podSelector"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [
        [{"port": ports["http"], "protocol": "TCP"}]
    ]
    trainer = _pod_labels("trainer")
    for namespace in ("team-a", "anywhere"):
        assert _admitted(policy, trainer, namespace, ports["http"])
    assert not _admitted(policy, trainer, "team-a", ports["healthz"])
    for component in ("exporter", "server"):
        assert not _admitted(policy, _pod_labels(component), "team-a", ports["http"])
    assert not _admitted(policy, {"app": "anything-else"}, "team-a", ports["http"])


def test_with_watched_namespaces_only_their_trainers_are_admitted(helm: str) -> None:  # noqa: F811
    policy = one(render(helm, "watch.namespaces={team-a,team-b}"), "NetworkPolicy")
    trainer = _pod_labels("trainer")
    assert _admitted(policy, trainer, "team-a", 8080)
    assert _admitted(policy, trainer, "team-b", 8080)
    assert not _admitted(policy, trainer, "team-c", 8080)


def test_metrics_sources_come_from_values_and_the_port_follows_the_progress_port(
    helm: str,  # noqa: F811
) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    values = {"networkPolicy": {"metricsFrom": [monitoring]}, "operator": {"progressPort": 9090}}
    policy = one(render(helm, values=values), "NetworkPolicy")
    assert _admitted(policy, {"app": "prometheus"}, "mon", 9090)
    assert not _admitted(policy, {"app": "prometheus"}, "elsewhere", 9090)
    assert _admitted(policy, _pod_labels("trainer"), "team-a", 9090)
    assert not _admitted(policy, _pod_labels("trainer"), "team-a", 8080)


def test_the_policy_can_be_turned_off(helm: str) -> None:  # noqa: F811
    docs = render(helm, "networkPolicy.enabled=false")
    assert [d for d in docs if d["kind"] == "NetworkPolicy"] == []
