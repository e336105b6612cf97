"""The Helm chart, rendered without a cluster: `helm lint`, `helm template` for several value
sets, exact RBAC rules, the restricted Pod Security profile and values.schema.json.

Needs the helm binary that hack/build-control-plane.sh builds (skipped with the reason when it
is not there). The real-cluster half is tests/e2e/test_chart.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = ROOT / "charts" / "kubetune"
BUILD_SCRIPT = ROOT / "hack" / "build-control-plane.sh"
BIN_DIR_ENV = "KUBETUNE_CONTROLPLANE_BIN"
KUBE_VERSION = "1.36.4"
RELEASE = "kt"
NAMESPACE = "kubetune-system"

Rule = tuple[str, str, tuple[str, ...], tuple[str, ...]]
"""(apiGroup, resource, verbs, resourceNames): one resource of a PolicyRule, normalised."""


def _rule(group: str, resources: list[str], verbs: list[str], names: tuple[str, ...] = ()) -> list[
    Rule
]:
    return [(group, resource, tuple(sorted(verbs)), names) for resource in resources]


WATCHED_CHILD = ["list", "watch", "create", "patch", "delete"]
# What `kubetune operator` calls in each namespace it serves. Changing the operator's API
# calls means changing this list, the chart's templates/_rbac.tpl and docs in one go.
NAMESPACED_RULES: list[Rule] = [
    *_rule("kubetune.io", ["finetunejobs"], ["list", "watch"]),
    *_rule("kubetune.io", ["finetunejobs/status"], ["patch"]),
    *_rule("", ["events"], ["create", "list"]),
    *_rule("batch", ["jobs"], WATCHED_CHILD),
    *_rule("apps", ["deployments"], WATCHED_CHILD),
    *_rule("", ["configmaps", "services"], WATCHED_CHILD),
    *_rule("", ["persistentvolumeclaims"], ["get", "list", "watch", "create", "patch"]),
    *_rule("", ["pods"], ["get", "list", "watch"]),
]
SECRET_RULES: list[Rule] = _rule("", ["secrets"], ["get"])
"""Only in watched namespaces' Roles: RBAC has no metadata-only read, so cluster-wide `get`
would mean every Secret of the cluster."""
CLUSTER_ONLY_RULES: list[Rule] = _rule("authentication.k8s.io", ["tokenreviews"], ["create"])
LEADER_RULES: list[Rule] = [
    *_rule("coordination.k8s.io", ["leases"], ["create"]),
    *_rule("coordination.k8s.io", ["leases"], ["get", "update"], ("kubetune-operator",)),
]


def normalise_rules(rules: list[dict[str, Any]] | list[Rule]) -> list[Rule]:
    """PolicyRules (or Rule tuples) as a sorted list of one-resource tuples."""
    flat: list[Rule] = []
    for rule in rules:
        if isinstance(rule, tuple):
            flat.append(rule)
            continue
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                names = tuple(sorted(rule.get("resourceNames", ())))
                flat.append((group, resource, tuple(sorted(rule["verbs"])), names))
    assert len(flat) == len(set(flat)), "a rule is listed twice"
    return sorted(flat)


RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}


def assert_restricted(pod: dict[str, Any]) -> None:
    """The checks of the `restricted` Pod Security Standard (v1.36) that a pod spec can fail."""
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), host
    pod_context = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container.get("securityContext", {})
        assert not context.get("privileged"), container["name"]
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        assert non_root is True, container["name"]
        assert context.get("runAsUser", pod_context.get("runAsUser")) != 0
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), container["name"]
        for port in container.get("ports", []):
            assert "hostPort" not in port


def helm_binary() -> tuple[str | None, str]:
    """The helm built by hack/build-control-plane.sh, or None and why it is missing."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        bin_dir = Path(override)
    else:
        text = BUILD_SCRIPT.read_text()
        versions = dict(re.findall(r"^(K8S_VERSION|KWOK_VERSION|HELM_VERSION)=(\S+)$", text, re.M))
        cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache_root = Path(os.environ.get("KUBETUNE_CACHE") or Path(cache_home) / "kubetune")
        bin_dir = cache_root / (
            f"controlplane-k8s{versions.get('K8S_VERSION')}-kwok{versions.get('KWOK_VERSION')}"
            f"-helm{versions.get('HELM_VERSION')}"
        ) / "bin"
    helm = bin_dir / "helm"
    if os.access(helm, os.X_OK):
        return str(helm), ""
    return None, f"no helm binary at {helm}: run `bash hack/build-control-plane.sh` (needs Go)"


@pytest.fixture(scope="module")
def helm() -> str:
    binary, reason = helm_binary()
    if binary is None:
        pytest.skip(reason)
    return binary


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False
    )


MONITORING_API = "monitoring.coreos.com/v1"
"""The Prometheus Operator's API: the chart renders its monitors only where it is served."""


def render(
    helm: str,
    *sets: str,
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The chart's objects for these values, on a cluster that serves `api_versions` beside
    the built-in ones (fresh copies; helm runs once per value set)."""
    rendered = _render(helm, sets, json.dumps(values or {}, sort_keys=True), api_versions)
    return copy.deepcopy(rendered)


@functools.cache
def _render(
    helm: str, sets: tuple[str, ...], values_json: str, api_versions: tuple[str, ...]
) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART_DIR), "-n", NAMESPACE, "--kube-version", KUBE_VERSION]
    for item in sets:
        args += ["--set", item]
    for version in api_versions:
        args += ["--api-versions", version]
    result = subprocess.run(
        [helm, *args, "-f", "-"],
        input=yaml.safe_dump(json.loads(values_json)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def flags_of(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])


def images_of(docs: list[dict[str, Any]]) -> list[str]:
    """Every image a rendered object runs or tells the operator to run."""
    images = []
    for deployment in by_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            images.append(container["image"])
            flags = flags_of(container)
            images += [flags["trainer-image"], flags["serving-image"]]
    return images


NAMESPACED = {"watch": {"namespaces": ["team-a", "team-b"]}}
PROMETHEUS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
SERVICE_MONITOR = {
    "metrics": {"serviceMonitor": {"enabled": True}},
    # The default NetworkPolicy admits only trainer pods: a scraper must be named.
    "networkPolicy": {"metricsFrom": [PROMETHEUS_PEER]},
}


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize(
    "values",
    [{}, NAMESPACED, SERVICE_MONITOR],
    ids=["defaults", "namespaced", "servicemonitor"],
)
def test_helm_lint_is_clean(helm: str, values: dict[str, Any], tmp_path: Any) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))

    result = run_helm(
        helm, "lint", "--strict", str(CHART_DIR), "-f", str(values_file),
        "--kube-version", KUBE_VERSION,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_chart_metadata_pins_app_version_and_a_kube_version_range() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"].startswith(">=")


def test_kube_version_range_accepts_1_36_and_refuses_an_old_cluster(helm: str) -> None:
    base = ["template", RELEASE, str(CHART_DIR), "--kube-version"]
    assert run_helm(helm, *base, "1.36.4").returncode == 0
    old = run_helm(helm, *base, "1.27.0")
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr


# --------------------------------------------------------------------------- defaults


def test_default_render_has_the_expected_objects(helm: str) -> None:
    docs = render(helm)
    kinds = sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs)
    operator = "kt-kubetune-operator"
    assert kinds == sorted(
        [
            ("ClusterRole", operator, None),
            ("ClusterRoleBinding", operator, None),
            ("Deployment", operator, NAMESPACE),
            ("NetworkPolicy", operator, NAMESPACE),
            ("Role", f"{operator}-leader", NAMESPACE),
            ("RoleBinding", f"{operator}-leader", NAMESPACE),
            ("Service", operator, NAMESPACE),
            ("ServiceAccount", operator, NAMESPACE),
        ]
    )


def test_operator_deployment_is_one_replica_recreate_with_probes_and_resources(
    helm: str,
) -> None:
    docs = render(helm)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kt-kubetune-operator"
    container = operator_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8081, "http": 8080}
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # Ready when the progress endpoint answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"] == {"memory": "512Mi"}
    assert container["command"] == ["kubetune", "operator"]
    assert container["args"] == [
        "--liveness-port=8081",
        "--progress-port=8080",
        f"--progress-url=http://kt-kubetune-operator.{NAMESPACE}.svc:8080",
        "--trainer-image=kubetune/trainer:0.1.0",
        "--serving-image=kubetune/trainer:0.1.0",
        "--image-pull-policy=IfNotPresent",
        "--lease-name=kubetune-operator",
        "--no-check-secrets",
    ]


def test_operator_pod_meets_the_restricted_profile_with_a_read_only_root(helm: str) -> None:
    pod = one(render(helm), "Deployment")["spec"]["template"]["spec"]

    assert_restricted(pod)
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert env_of(container)["HOME"] == "/tmp"


def test_operator_finds_its_lease_namespace_and_workload_service_accounts(helm: str) -> None:
    env = env_of(operator_container(render(helm)))
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Cluster-wide the chart cannot create ServiceAccounts in every namespace: none is named.
    assert "KUBETUNE_TRAINER_SERVICE_ACCOUNT" not in env
    namespaced = env_of(operator_container(render(helm, values=NAMESPACED)))
    assert namespaced["KUBETUNE_TRAINER_SERVICE_ACCOUNT"] == "kubetune-trainer"
    assert namespaced["KUBETUNE_SERVING_SERVICE_ACCOUNT"] == "kubetune-serving"


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm: str) -> None:
    docs = render(helm)
    cluster_role = one(docs, "ClusterRole")
    assert normalise_rules(cluster_role["rules"]) == normalise_rules(
        CLUSTER_ONLY_RULES + NAMESPACED_RULES
    )
    assert not any("secrets" in rule["resources"] for rule in cluster_role["rules"])
    leader = one(docs, "Role", "kt-kubetune-operator-leader")
    assert normalise_rules(leader["rules"]) == normalise_rules(LEADER_RULES)
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune-operator", "namespace": NAMESPACE}
    ]


def test_no_rule_grants_wildcards_or_escalation(helm: str) -> None:
    for values in ({}, NAMESPACED):
        for role in by_kind(render(helm, values=values), "ClusterRole") + by_kind(
            render(helm, values=values), "Role"
        ):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
                assert not {"clusterroles", "roles", "nodes"} & set(rule["resources"])
                if "secrets" in rule["resources"]:
                    assert rule["verbs"] == ["get"], "secrets are only checked to exist"


def test_workload_service_accounts_have_no_token_and_no_binding(helm: str) -> None:
    docs = render(helm, values=NAMESPACED)
    workload = [
        sa
        for sa in by_kind(docs, "ServiceAccount")
        if sa["metadata"]["name"] != "kt-kubetune-operator"
    ]
    placed = sorted((sa["metadata"]["namespace"], sa["metadata"]["name"]) for sa in workload)
    assert placed == sorted(
        (ns, name)
        for ns in ("team-a", "team-b")
        for name in ("kubetune-trainer", "kubetune-serving")
    )
    assert all(sa["automountServiceAccountToken"] is False for sa in workload)
    bound = {
        s["name"]
        for b in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
        for s in b["subjects"]
    }
    assert bound == {"kt-kubetune-operator"}


# --------------------------------------------------------------------------- namespaced


def test_namespaced_mode_uses_roles_only_in_the_listed_namespaces(helm: str) -> None:
    docs = render(helm, values=NAMESPACED)

    cluster_role = one(docs, "ClusterRole")
    # TokenReview is cluster-scoped: the only thing left cluster-wide.
    assert normalise_rules(cluster_role["rules"]) == normalise_rules(CLUSTER_ONLY_RULES)
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(docs, "Role")
    }
    assert set(roles) == {
        ("team-a", "kt-kubetune-operator"),
        ("team-b", "kt-kubetune-operator"),
        (NAMESPACE, "kt-kubetune-operator-leader"),
    }
    for namespace in ("team-a", "team-b"):
        assert normalise_rules(roles[(namespace, "kt-kubetune-operator")]["rules"]) == (
            normalise_rules(NAMESPACED_RULES + SECRET_RULES)
        )
    bindings = {
        (b["metadata"]["namespace"], b["metadata"]["name"]): b
        for b in by_kind(docs, "RoleBinding")
    }
    assert set(bindings) == set(roles)
    for binding in bindings.values():
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kt-kubetune-operator", "namespace": NAMESPACE}
        ]


def test_namespaced_mode_starts_the_operator_on_those_namespaces(helm: str) -> None:
    container = operator_container(render(helm, values=NAMESPACED))
    assert container["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--no-check-secrets" not in container["args"]


def test_cluster_wide_the_operator_does_not_look_secrets_up(helm: str) -> None:
    """It holds no `secrets: get` there, so a lookup would only be refused."""
    assert "--no-check-secrets" in operator_container(render(helm))["args"]


def test_rendered_operator_arguments_are_accepted_by_the_operator_cli(helm: str) -> None:
    from kubetune import cli

    parser = cli.build_parser()
    commands = {
        name
        for action in parser._actions
        if hasattr(action, "choices") and isinstance(action.choices, dict)
        for name in action.choices
    }
    assert "operator" in commands
    for values in ({}, NAMESPACED, {"operator": {"logLevel": "debug"}}):
        container = operator_container(render(helm, values=values))
        parser.parse_args([*container["command"][1:], *container["args"]])


# --------------------------------------------------------------------------- images


def test_custom_images_and_digests_reach_the_operator(helm: str) -> None:
    digest = "sha256:" + "ab" * 32
    values = {
        "operator": {"image": {"repository": "mirror.invalid/kt/operator", "tag": "0.2.0"}},
        "trainer": {"image": {"repository": "mirror.invalid/kt/trainer", "digest": digest}},
        "serving": {"image": {"repository": "mirror.invalid/kt/server", "tag": "0.2.0-cpu"}},
    }
    docs = render(helm, values=values)
    container = operator_container(docs)
    assert container["image"] == "mirror.invalid/kt/operator:0.2.0"
    flags = flags_of(container)
    assert flags["trainer-image"] == f"mirror.invalid/kt/trainer@{digest}"
    assert flags["serving-image"] == "mirror.invalid/kt/server:0.2.0-cpu"


@pytest.mark.parametrize(
    "values",
    [{}, NAMESPACED, SERVICE_MONITOR],
    ids=["defaults", "namespaced", "servicemonitor"],
)
def test_nothing_pulls_latest(helm: str, values: dict[str, Any]) -> None:
    for image in images_of(render(helm, values=values)):
        name, _, tag = image.rpartition(":")
        assert name and "@" not in image and tag not in ("", "latest"), image


# --------------------------------------------------------------------------- metrics


def test_service_monitor_is_optional_and_scrapes_the_metrics_service(helm: str) -> None:
    assert by_kind(render(helm, api_versions=(MONITORING_API,)), "ServiceMonitor") == []
    docs = render(
        helm,
        values={
            **SERVICE_MONITOR,
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        },
        api_versions=(MONITORING_API,),
    )
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"].items() <= (
        one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.image.tag=latest", "operator.image.tag must be a pinned version"),
        ("trainer.image.tag=latest", "trainer.image.tag must be a pinned version"),
        ("trainer.image.tag=", "/trainer/image/tag"),
        ("operator.image.digest=sha256:abc", "/operator/image/digest"),
        ("operator.image.pullPolicy=Sometimes", "/operator/image/pullPolicy"),
        ("watch.namespaces[0]=Team_A", "/watch/namespaces/0"),
        ("operator.livenessPort=80", "/operator/livenessPort"),
        ("operator.progressPort=8081", "livenessPort and operator.progressPort must differ"),
        ("operator.logLevel=chatty", "/operator/logLevel"),
        ("operatr.logLevel=info", "additional properties 'operatr' not allowed"),
        ("metrics.serviceMonitor.interval=soon", "/metrics/serviceMonitor/interval"),
        ("serving.image.repository=kt/server", "serving.image.tag must be a pinned version"),
        ("rbac.create=maybe", "/rbac/create"),
        # Object names are `<fullname>-operator`: a Service name is a DNS-1035 label.
        ("fullnameOverride=KubeTune_Prod", "/fullnameOverride"),
        ("fullnameOverride=1st", "/fullnameOverride"),
        ("nameOverride=Tune.Me", "/nameOverride"),
        # The chart's own labels: a second key makes the Deployment's selector miss its pods
        # (the API server refuses it), or the ServiceMonitor's miss the Service.
        ("operator.podLabels.app\\.kubernetes\\.io/component=x",
         "/operator/podLabels/app.kubernetes.io~1component"),
        ("commonLabels.app\\.kubernetes\\.io/instance=x",
         "/commonLabels/app.kubernetes.io~1instance"),
        ("commonLabels.helm\\.sh/chart=x", "/commonLabels/helm.sh~1chart"),
        ("metrics.serviceMonitor.labels.app\\.kubernetes\\.io/name=x",
         "/metrics/serviceMonitor/labels/app.kubernetes.io~1name"),
    ],
)
def test_wrong_values_are_refused_with_a_message_naming_them(
    helm: str, setting: str, message: str
) -> None:
    result = run_helm(
        helm, "template", RELEASE, str(CHART_DIR), "--kube-version", KUBE_VERSION,
        "--set", setting,
    )
    assert result.returncode != 0, f"{setting} was accepted"
    assert message in result.stderr


def test_every_value_in_values_yaml_is_documented() -> None:
    """Each leaf value has a `#` comment above it or sits inside a documented block."""
    undocumented = []
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    previous = ""
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-"):
            previous = stripped or previous
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        key, _, value = stripped.partition(":")
        documented = previous.startswith("#") or any(doc for _, doc in ancestors)
        if value.strip() and not documented:
            undocumented.append(key)
        ancestors.append((indent, documented))
        previous = stripped
    assert undocumented == [], f"values without a comment above them: {undocumented}"


# --------------------------------------------------------------------------- contradictions


def refusal(helm: str, values: dict[str, Any]) -> str:
    """helm's error for values the chart must refuse (fails the test if they render)."""
    result = subprocess.run(
        [helm, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE,
         "--kube-version", KUBE_VERSION, "-f", "-"],
        input=yaml.safe_dump(values), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0, f"rendered {values}:\n{result.stdout}"
    return result.stderr


def workload_accounts(
    trainer: dict[str, Any], serving: dict[str, Any] | None = None, **values: Any
) -> dict[str, Any]:
    """Namespaced values with these trainer (and serving) ServiceAccount settings."""
    accounts = {"trainer": {"serviceAccount": trainer}}
    if serving is not None:
        accounts["serving"] = {"serviceAccount": serving}
    return {**NAMESPACED, **accounts, **values}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        pytest.param(
            workload_accounts({"create": True, "name": ""}),
            ["trainer.serviceAccount.name", "trainer.serviceAccount.create"],
            id="trainer-account-created-without-a-name",
        ),
        pytest.param(
            workload_accounts({"create": True, "name": "kubetune-trainer"},
                              {"create": True, "name": ""}),
            ["serving.serviceAccount.name", "serving.serviceAccount.create"],
            id="serving-account-created-without-a-name",
        ),
        pytest.param(
            workload_accounts({"create": True, "name": "kt-pods"},
                              {"create": True, "name": "kt-pods"}),
            ["trainer.serviceAccount.name", "serving.serviceAccount.name", '"kt-pods"'],
            id="one-account-created-twice",
        ),
        pytest.param(
            # The release namespace is watched: trainer pods would run as the operator.
            {"watch": {"namespaces": ["team-a", NAMESPACE]},
             "trainer": {"serviceAccount": {"create": False, "name": "kt-kubetune-operator"}}},
            ["trainer.serviceAccount.name", "operator.serviceAccount.name",
             '"kt-kubetune-operator"'],
            id="trainer-runs-as-the-operator",
        ),
        pytest.param(
            {"watch": {"namespaces": [NAMESPACE]},
             "operator": {"serviceAccount": {"name": "kubetune-serving"}}},
            ["serving.serviceAccount.name", "operator.serviceAccount.name", '"kubetune-serving"'],
            id="server-runs-as-the-operator",
        ),
        pytest.param(
            {"metrics": {"serviceMonitor": {"enabled": True}}},
            ["metrics.serviceMonitor.enabled", "networkPolicy.metricsFrom",
             "networkPolicy.enabled"],
            id="service-monitor-behind-the-network-policy",
        ),
        pytest.param(
            {**SERVICE_MONITOR,
             "metrics": {"serviceMonitor": {"enabled": True, "interval": "30s",
                                            "scrapeTimeout": "1m"}}},
            ["metrics.serviceMonitor.scrapeTimeout", '"1m"', "metrics.serviceMonitor.interval",
             '"30s"'],
            id="scrape-timeout-longer-than-the-interval",
        ),
    ],
)
def test_contradictory_values_are_refused_with_a_message_naming_them(
    helm: str, values: dict[str, Any], named: list[str]
) -> None:
    message = refusal(helm, values)
    assert [name for name in named if name not in message] == [], message


def test_an_empty_workload_account_name_means_the_default_account_when_not_created(
    helm: str,
) -> None:
    docs = render(helm, values=workload_accounts({"create": False, "name": ""}))
    names = {sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")}
    assert names == {"kt-kubetune-operator", "kubetune-serving"}
    env = env_of(operator_container(docs))
    assert "KUBETUNE_TRAINER_SERVICE_ACCOUNT" not in env
    assert env["KUBETUNE_SERVING_SERVICE_ACCOUNT"] == "kubetune-serving"


def test_trainer_and_server_share_an_account_that_is_created_once(helm: str) -> None:
    docs = render(helm, values=workload_accounts({"create": True, "name": "kt-pods"},
                                                 {"create": False, "name": "kt-pods"}))
    placed = sorted((sa["metadata"]["namespace"], sa["metadata"]["name"])
                    for sa in by_kind(docs, "ServiceAccount"))
    assert placed == [("kubetune-system", "kt-kubetune-operator"), ("team-a", "kt-pods"),
                      ("team-b", "kt-pods")]
    env = env_of(operator_container(docs))
    assert env["KUBETUNE_TRAINER_SERVICE_ACCOUNT"] == env["KUBETUNE_SERVING_SERVICE_ACCOUNT"]


def test_cluster_wide_the_workload_account_values_are_unused_and_not_checked(
    helm: str,
) -> None:
    """No workload ServiceAccount is rendered or named without watch.namespaces."""
    values = {"trainer": {"serviceAccount": {"create": True, "name": ""}},
              "serving": {"serviceAccount": {"create": True, "name": ""}}}
    docs = render(helm, values=values)
    assert [sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")] == [
        "kt-kubetune-operator"
    ]


@pytest.mark.parametrize(
    "values",
    [
        {"metrics": {"serviceMonitor": {"enabled": True}}, "networkPolicy": {"enabled": False}},
        {**SERVICE_MONITOR,
         "metrics": {"serviceMonitor": {"enabled": True, "interval": "1m",
                                        "scrapeTimeout": "60000ms"}}},
    ],
    ids=["no-network-policy", "timeout-equal-to-interval"],
)
def test_a_reachable_service_monitor_renders(helm: str, values: dict[str, Any]) -> None:
    assert one(render(helm, values=values, api_versions=(MONITORING_API,)), "ServiceMonitor")
