"""The chart's NetworkPolicies: the operator's progress port admits KubeTune's trainer pods
(and `networkPolicy.metricsFrom`), nothing else; with `serving.networkPolicy.enabled`, the
inference servers' port admits the pods of their own namespace (or `serving.networkPolicy.from`)
and `networkPolicy.metricsFrom`. Rendered with `helm template`, like test_chart.py (skipped
with the reason when the helm binary is not built).

The pods checked against the policies' selectors are the ones the operator really builds
(`builders.training.training_job`, `builders.serving.serving_deployment`), so a label or port
renamed in the builders fails here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders.export import export_job
from kubetune.builders.meta import Owner, training_hash
from kubetune.builders.naming import COMPONENT_POOL_SERVER
from kubetune.builders.pool import pool_labels
from kubetune.builders.serving import serving_deployment
from kubetune.builders.training import training_job
from tests.unit.deploy.test_chart import (  # noqa: F401  (helm: fixture)
    CHART_DIR,
    KUBE_VERSION,
    helm,
    one,
    render,
    run_helm,
)
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
            if "namespaceSelector" not in peer and namespace != policy["metadata"]["namespace"]:
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


# ------------------------------------------------------------------ the inference servers' policy

SERVING_POLICY = "kt-kubetune-serving"


def _server_port() -> int:
    owner = Owner.from_body(body())
    spec = FineTuneJobSpec.model_validate(spec_dict())
    deployment = serving_deployment(owner, 1, None, spec, CONFIG)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [port] = container["ports"]
    return int(port["containerPort"])


def _serving_policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The inference servers' NetworkPolicies by namespace."""
    return {
        doc["metadata"]["namespace"]: doc
        for doc in docs
        if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == SERVING_POLICY
    }


def test_the_servers_policy_is_off_unless_asked_for(helm: str) -> None:  # noqa: F811
    assert _serving_policies(render(helm)) == {}
    assert _serving_policies(render(helm, "serving.networkPolicy.enabled=false")) == {}


def test_the_servers_port_admits_its_own_namespace_only_by_default(helm: str) -> None:  # noqa: F811
    policies = _serving_policies(render(helm, "serving.networkPolicy.enabled=true"))
    assert list(policies) == ["kubetune-system"]  # cluster-wide: the release namespace
    policy = policies["kubetune-system"]
    port = _server_port()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert selects(policy["spec"]["podSelector"], _pod_labels("server"))
    for component in ("trainer", "exporter"):
        assert not selects(policy["spec"]["podSelector"], _pod_labels(component))
    client = {"app": "my-client"}
    assert _admitted(policy, client, "kubetune-system", port)
    assert not _admitted(policy, client, "elsewhere", port)
    assert not _admitted(policy, client, "kubetune-system", port + 1)
    # The operator's own policy is still there, unchanged.
    assert one(render(helm, "serving.networkPolicy.enabled=true"), "NetworkPolicy",
               "kt-kubetune-operator")


def test_the_servers_policy_goes_to_every_watched_namespace(helm: str) -> None:  # noqa: F811
    policies = _serving_policies(
        render(helm, "serving.networkPolicy.enabled=true", "watch.namespaces={team-a,team-b}")
    )
    assert sorted(policies) == ["team-a", "team-b"]
    port = _server_port()
    assert _admitted(policies["team-a"], {"app": "x"}, "team-a", port)
    assert not _admitted(policies["team-a"], {"app": "x"}, "team-b", port)
    listed = _serving_policies(render(helm, values={
        "serving": {"networkPolicy": {"enabled": True, "namespaces": ["models"]}},
        "watch": {"namespaces": ["team-a"]},
    }))
    assert sorted(listed) == ["models"]  # an explicit list wins


def test_the_servers_peers_and_scrapers_come_from_values(helm: str) -> None:  # noqa: F811
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    policy = _serving_policies(render(helm, values={
        "serving": {"networkPolicy": {"enabled": True, "from": [gateway]}},
        "networkPolicy": {"metricsFrom": [monitoring]},
    }))["kubetune-system"]
    port = _server_port()
    assert _admitted(policy, {"app": "envoy"}, "gateway", port)
    assert _admitted(policy, {"app": "prometheus"}, "mon", port)  # /metrics is on that port
    assert not _admitted(policy, {"app": "x"}, "kubetune-system", port)  # `from` replaces it
    assert not _admitted(policy, {"app": "x"}, "elsewhere", port)


def test_the_operator_reaches_every_server_to_drive_a_pools_adapters(helm: str) -> None:  # noqa: F811
    """The operator POSTs load_lora_adapter to each pool replica from the release namespace,
    whatever `from` admits; a pool's pods are selected as every server's are."""
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    policy = _serving_policies(render(helm, values={
        "serving": {"networkPolicy": {"enabled": True, "from": [gateway],
                                      "namespaces": ["team-a"]}},
    }))["team-a"]
    operator = one(render(helm), "Deployment")["spec"]["template"]["metadata"]["labels"]
    port = _server_port()
    assert _admitted(policy, operator, "kubetune-system", port)
    assert not _admitted(policy, operator, "team-a", port)  # the labels alone prove nothing
    assert not _admitted(policy, {"app": "x"}, "kubetune-system", port)
    assert selects(policy["spec"]["podSelector"], pool_labels("team", COMPONENT_POOL_SERVER))


def test_wrong_serving_policy_values_are_refused(helm: str) -> None:  # noqa: F811
    for setting, message in [
        ("serving.networkPolicy.enabled=maybe", "/serving/networkPolicy/enabled"),
        ("serving.networkPolicy.namespaces[0]=Team_A", "/serving/networkPolicy/namespaces/0"),
        ("serving.networkPolicy.form[0].podSelector=x", "additional properties 'form'"),
    ]:
        result = run_helm(helm, "template", "kt", str(CHART_DIR), "--kube-version",
                          KUBE_VERSION, "--set", setting)
        assert result.returncode != 0, f"{setting} was accepted"
        assert message in result.stderr, result.stderr
