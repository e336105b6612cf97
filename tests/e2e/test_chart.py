"""The Helm chart on the real control plane: install, the operator ServiceAccount's RBAC (what
it may and may not do, asked of the API server with impersonation), restricted Pod Security
admission of every pod KubeTune runs, upgrade and uninstall, and a whole FineTuneJob lifecycle
driven by an operator that holds only the chart's ServiceAccount token.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, wait_for

from tests.cases.manifests import base_manifest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
CRD = "finetunejobs.kubetune.io"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
TERMINATION_MESSAGE = "kubetune.io/fake-termination-message"
# kopf's cluster scanning (CRDs, namespaces) is not granted; the operator turns it off
# (`settings.scanning.disabled`) for exact namespaces, so kopf must not even try.
KOPF_SCANNING = (
    'cannot list resource "customresourcedefinitions"',
    'cannot list resource "namespaces"',
    "Not enough permissions to",
)
ANONYMOUS_CLIENT = (
    "kubetune.operator.client.KubeClient sent no token, so the API server saw system:anonymous "
    "(the loaders store it as api_key['BearerToken'])"
)


def _suffix() -> str:
    return uuid.uuid4().hex[:6]


def create_namespace(cluster: Cluster, name: str, labels: dict[str, str] | None = None) -> str:
    metadata = {"name": name, "labels": labels or {}}
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    # Pods are rejected by the ServiceAccount admission plugin until `default` exists.
    cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=name, timeout=30)
    return name


def delete_namespaces(cluster: Cluster, *names: str) -> None:
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                        check=False)


def has_condition(kind: str, status: str = "True") -> Any:
    def check(obj: dict[str, Any]) -> bool:
        return any(
            c["type"] == kind and c["status"] == status
            for c in obj.get("status", {}).get("conditions", [])
        )

    return check


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    watched: tuple[str, ...]
    install_output: str

    @property
    def operator(self) -> str:
        """Deployment, ServiceAccount, ClusterRole and Service name (`<release>-operator`)."""
        return f"{self.name}-operator"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.operator}"


def install(cluster: Cluster, name: str, namespace: str, *sets: str) -> Release:
    # The release name holds "kubetune", so objects are `<release>-operator`.
    args = ["install", name, str(CHART), "-n", namespace, "--wait", "--timeout", "120s"]
    for item in sets:
        args += ["--set", item]
    output = cluster.helm(*args).stdout
    watched = tuple(
        s.split("=", 1)[1].strip("{}") for s in sets if s.startswith("watch.namespaces")
    )
    return Release(name, namespace, tuple(w for ws in watched for w in ws.split(",")), output)


def can_i(cluster: Cluster, user: str, verb: str, resource: str, *flags: str) -> bool:
    """`kubectl auth can-i` as `user`: the API server's own RBAC decision."""
    result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={user}", *flags,
                             check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def decisions(
    cluster: Cluster, user: str, checks: list[tuple[str, str, tuple[str, ...]]]
) -> dict[str, bool]:
    """Many can-i questions at once; keys read like the kubectl command."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = pool.map(lambda c: can_i(cluster, user, c[0], c[1], *c[2]), checks)
        return {f"{verb} {resource} {' '.join(flags)}".strip(): ok
                for (verb, resource, flags), ok in zip(checks, answers, strict=True)}


def argocd_health(obj: dict[str, Any]) -> str:
    """docs/argocd-health.lua on a real status, under Lua 5.1 as Argo CD runs it."""
    from lupa import lua51

    runtime = lua51.LuaRuntime()

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    health = runtime.eval("function(obj) " + (ROOT / "docs" / "argocd-health.lua").read_text()
                          + "\nend")
    return str(health(to_lua(obj))["status"])


# --------------------------------------------------------------------------- cluster-wide


@pytest.fixture(scope="module")
def cluster_wide(cluster: Cluster) -> Iterator[Release]:
    suffix = _suffix()
    namespace = create_namespace(cluster, f"kubetune-{suffix}", RESTRICTED)
    release = install(cluster, f"kubetune-{suffix}", namespace)
    yield release
    cluster.helm("uninstall", release.name, "-n", namespace, "--wait", check=False)
    delete_namespaces(cluster, namespace)


def test_install_runs_one_operator_pod_in_a_restricted_namespace(
    cluster: Cluster, cluster_wide: Release
) -> None:
    deployment = cluster.wait_for(
        "deployment", cluster_wide.operator, has_condition("Available"),
        namespace=cluster_wide.namespace,
    )
    assert deployment["spec"]["replicas"] == 1
    assert deployment["status"]["readyReplicas"] == 1
    # The pod was admitted under `enforce: restricted` (the namespace's label), or the
    # ReplicaSet could not have created it.
    pods = json.loads(cluster.kubectl(
        "get", "pods", "-n", cluster_wide.namespace, "-o", "json",
        "-l", "app.kubernetes.io/component=operator",
    ).stdout)["items"]
    assert len(pods) == 1
    assert pods[0]["spec"]["serviceAccountName"] == cluster_wide.operator
    assert cluster.get("crd", CRD) is not None
    # NOTES.txt: the next steps.
    assert f"rollout status deployment/{cluster_wide.operator}" in cluster_wide.install_output
    assert "kubectl wait --for=condition=Ready" in cluster_wide.install_output


def test_operator_service_account_can_do_its_work_everywhere(
    cluster: Cluster, cluster_wide: Release
) -> None:
    ns = ("-n", "any-team")
    lease = ("-n", cluster_wide.namespace)
    allowed = decisions(cluster, cluster_wide.user, [
        ("watch", "finetunejobs.kubetune.io", ("-A",)),
        ("patch", "finetunejobs.kubetune.io", (*ns, "--subresource=status")),
        ("create", "jobs.batch", ns),
        ("delete", "jobs.batch", ns),
        ("watch", "jobs.batch", ("-A",)),
        ("patch", "deployments.apps", ns),
        ("delete", "deployments.apps", ns),
        ("create", "configmaps", ns),
        ("patch", "services", ns),
        ("watch", "configmaps", ("-A",)),
        ("watch", "services", ("-A",)),
        ("watch", "persistentvolumeclaims", ("-A",)),
        ("create", "persistentvolumeclaims", ns),
        ("get", "persistentvolumeclaims", ns),
        ("watch", "pods", ("-A",)),
        ("get", "pods", ns),
        ("create", "events", ns),
        ("create", "tokenreviews.authentication.k8s.io", ()),
        ("create", "leases.coordination.k8s.io", lease),
        ("update", "leases.coordination.k8s.io/kubetune-operator", lease),
    ])
    assert [check for check, ok in allowed.items() if not ok] == []


def test_operator_service_account_cannot_do_what_it_does_not_need(
    cluster: Cluster, cluster_wide: Release
) -> None:
    ns = ("-n", "any-team")
    lease = ("-n", cluster_wide.namespace)
    refused = decisions(cluster, cluster_wide.user, [
        ("delete", "nodes", ()),
        ("create", "clusterroles.rbac.authorization.k8s.io", ()),
        ("create", "rolebindings.rbac.authorization.k8s.io", ns),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", ()),
        ("impersonate", "serviceaccounts", ns),
        ("create", "serviceaccounts/token", ns),
        # No Secret access at all cluster-wide: RBAC has no metadata-only read, so `get` in
        # every namespace would mean every Secret of the cluster (the operator runs with
        # --no-check-secrets there).
        ("get", "secrets", ns),
        ("get", "secrets", ("-n", "kube-system")),
        ("list", "secrets", ns),
        ("watch", "secrets", ("-A",)),
        ("create", "secrets", ns),
        ("create", "pods", ns),
        ("create", "pods/exec", ns),
        ("delete", "pods", ns),
        ("delete", "persistentvolumeclaims", ns),
        ("delete", "finetunejobs.kubetune.io", ns),
        ("create", "finetunejobs.kubetune.io", ns),
        # Only status: the spec and metadata are the user's (kopf writes no annotations).
        ("patch", "finetunejobs.kubetune.io", ns),
        ("update", "customresourcedefinitions.apiextensions.k8s.io", ()),
        ("delete", "namespaces", ()),
        ("update", "leases.coordination.k8s.io/someone-else", lease),
        ("update", "leases.coordination.k8s.io/kubetune-operator", ns),
        ("update", "deployments.apps", (*ns, "--subresource=scale")),
    ])
    assert [check for check, ok in refused.items() if ok] == []


# --------------------------------------------------------------------------- namespaced


@pytest.fixture(scope="module")
def namespaced(cluster: Cluster) -> Iterator[Release]:
    suffix = _suffix()
    system = create_namespace(cluster, f"kubetune-ns-{suffix}", RESTRICTED)
    watched = create_namespace(cluster, f"team-{suffix}", RESTRICTED)
    other = create_namespace(cluster, f"other-{suffix}")
    release = install(cluster, f"kubetune-ns-{suffix}", system, f"watch.namespaces={{{watched}}}")
    yield release
    cluster.helm("uninstall", release.name, "-n", system, "--wait", check=False)
    delete_namespaces(cluster, system, watched, other)


def test_namespaced_operator_is_confined_to_its_namespaces(
    cluster: Cluster, namespaced: Release
) -> None:
    [watched] = namespaced.watched
    other = watched.replace("team-", "other-")
    answers = decisions(cluster, namespaced.user, [
        ("watch", "finetunejobs.kubetune.io", ("-n", watched)),
        ("get", "secrets", ("-n", watched)),
        ("create", "jobs.batch", ("-n", watched)),
        ("create", "tokenreviews.authentication.k8s.io", ()),
        ("update", "leases.coordination.k8s.io/kubetune-operator", ("-n", namespaced.namespace)),
        # Outside the watched namespace: nothing.
        ("get", "secrets", ("-n", other)),
        ("get", "secrets", ("-n", "kube-system")),
        ("get", "secrets", ("-n", namespaced.namespace)),
        ("create", "jobs.batch", ("-n", other)),
        ("watch", "finetunejobs.kubetune.io", ("-A",)),
        ("watch", "pods", ("-n", other)),
        ("create", "deployments.apps", ("-n", "default")),
    ])
    granted = {check for check, ok in answers.items() if ok}
    assert granted == set(list(answers)[:5])


def test_namespaced_release_creates_tokenless_workload_service_accounts(
    cluster: Cluster, namespaced: Release
) -> None:
    [watched] = namespaced.watched
    for name in ("kubetune-trainer", "kubetune-serving"):
        account = cluster.get("serviceaccount", name, watched)
        assert account is not None, f"{name} missing in {watched}"
        assert account["automountServiceAccountToken"] is False
        assert can_i(cluster, f"system:serviceaccount:{watched}:{name}", "get", "pods",
                     "-n", watched) is False


# --------------------------------------------------------------------------- pod security


def _pod_from_template(owner: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    template = owner["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": template["metadata"].get("labels", {})},
        "spec": template["spec"],
    }


def test_trainer_export_and_serving_pods_are_admitted_as_restricted(
    cluster: Cluster, namespace: str
) -> None:
    from kubetune.api import FineTuneJobSpec
    from kubetune.builders.config import OperatorConfig
    from kubetune.builders.export import export_job
    from kubetune.builders.meta import Owner, training_hash
    from kubetune.builders.serving import serving_deployment
    from kubetune.builders.training import training_job

    cluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    config = OperatorConfig()
    owner = Owner(name="pss", namespace=namespace, uid=str(uuid.uuid4()))
    specs = {
        "gpu": FineTuneJobSpec.model_validate({
            "model": {"source": "hf://org/model", "secretRef": {"name": "hf-token"}},
            "dataset": {"source": "builtin://kubectl-commands"},
            "method": "QLoRA",
            "resources": {"nodes": 2, "gpusPerNode": 8},
            "serving": {"device": "CUDA", "resources": {"gpus": 1}},
        }),
        "cpu": FineTuneJobSpec.model_validate({
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": "builtin://kubectl-commands"},
            "resources": {"gpusPerNode": 0},
        }),
    }
    workloads = []
    for label, spec in specs.items():
        workloads += [
            (f"train-{label}", training_job(
                owner, 1, spec, config, training_hash(spec))),
            (f"export-{label}", export_job(owner, 1, spec, config)),
            (f"serve-{label}", serving_deployment(owner, 1, None, spec, config)),
        ]
    for name, workload in workloads:
        workload["metadata"]["name"] = name
        workload["metadata"]["namespace"] = namespace
        # The Job or Deployment itself: PodSecurity warns (never refuses) on pod templates.
        created = cluster.kubectl("create", "--dry-run=server", "-f", "-", "-o", "name",
                                  input=json.dumps(workload), check=False)
        assert created.returncode == 0, created.stderr
        assert "PodSecurity" not in created.stderr, f"{name}: {created.stderr}"
        # The pod it would make: `enforce: restricted` refuses a violating one outright.
        pod = _pod_from_template(workload, namespace, name)
        admitted = cluster.kubectl("create", "--dry-run=server", "-f", "-", "-o", "name",
                                   input=json.dumps(pod), check=False)
        assert admitted.returncode == 0, f"{name}: {admitted.stderr}"


def test_a_privileged_pod_is_refused_there(cluster: Cluster, namespace: str) -> None:
    """The control: the namespace label really enforces the profile."""
    cluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]},
    }
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod),
                              check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr


# --------------------------------------------------------------------------- upgrade, uninstall


def _quick_job(name: str) -> dict[str, Any]:
    manifest = base_manifest(name)
    manifest["spec"]["resources"] = {"gpusPerNode": 0}
    return manifest


def test_upgrade_rolls_the_operator_and_uninstall_keeps_crd_and_jobs(
    cluster: Cluster, namespace: str
) -> None:
    suffix = _suffix()
    system = create_namespace(cluster, f"kubetune-up-{suffix}", RESTRICTED)
    try:
        release = install(cluster, f"kubetune-up-{suffix}", system)
        cluster.kubectl("apply", "-n", namespace, "-f", "-",
                        input=json.dumps(_quick_job("survivor")))
        before = cluster.get("deployment", release.operator, system)
        assert before is not None

        cluster.helm("upgrade", release.name, str(CHART), "-n", system, "--reuse-values",
                     "--set", "operator.logLevel=debug", "--set", "operator.image.tag=0.1.1",
                     "--wait", "--timeout", "120s")

        after = cluster.wait_for(
            "deployment", release.operator,
            lambda d: d["status"].get("observedGeneration", 0) > before["metadata"]["generation"]
            and has_condition("Available")(d),
            namespace=system,
        )
        container = after["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "kubetune/operator:0.1.1"
        assert "--verbose" in container["args"]
        assert after["spec"]["strategy"] == {"type": "Recreate"}
        history = json.loads(cluster.helm("history", release.name, "-n", system,
                                          "-o", "json").stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]

        cluster.helm("uninstall", release.name, "-n", system, "--wait")

        assert cluster.get("deployment", release.operator, system) is None
        assert cluster.get("clusterrole", release.operator) is None
        assert cluster.get("clusterrolebinding", release.operator) is None
        assert cluster.get("serviceaccount", release.operator, system) is None
        # Helm never deletes what it installed from crds/: the CRD and users' jobs stay.
        assert cluster.get("crd", CRD) is not None
        assert cluster.get("finetunejob", "survivor", namespace) is not None
    finally:
        cluster.helm("uninstall", f"kubetune-up-{suffix}", "-n", system, check=False)
        delete_namespaces(cluster, system)


# --------------------------------------------------------------------------- lifecycle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_account_kubeconfig(cluster: Cluster, release: Release, path: Path) -> Path:
    """A kubeconfig holding only a token of the chart's operator ServiceAccount."""
    return cluster.token_kubeconfig(release.operator, release.namespace, path)


@contextlib.contextmanager
def operator_process(
    cluster: Cluster, release: Release, kubeconfig: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`kubetune operator` with the arguments and environment of the chart's own Deployment
    (read back from the cluster), local ports, and the SA token's kubeconfig."""
    deployment = cluster.get("deployment", release.operator, release.namespace)
    assert deployment is not None
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    local = ("--liveness-port=", "--progress-port=", "--progress-url=")
    chart_args = [a for a in container["args"] if not a.startswith(local)]
    progress = _free_port()
    argv = [
        sys.executable, "-m", "kubetune.cli", "operator", "--kubeconfig", str(kubeconfig),
        *chart_args, f"--lease-namespace={release.namespace}",
        f"--liveness-port={_free_port()}", f"--progress-port={progress}",
        f"--progress-url=http://127.0.0.1:{progress}",
        "--allow-pod-metadata", "--resync-seconds=5",
    ]
    env = {k: v for k, v in cluster.env.items() if k != "KUBECONFIG"}
    env["KUBECONFIG"] = str(kubeconfig)
    # The chart's plain values (the workload ServiceAccounts in namespaced mode); HOME stays
    # ours, POD_NAMESPACE is the --lease-namespace above.
    env.update({e["name"]: e["value"] for e in container.get("env", [])
                if "value" in e and e["name"] != "HOME"})
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def storage_class(cluster: Cluster) -> Iterator[str]:
    """A PersistentVolume the artifact PVC the operator creates can bind to: the control
    plane has no provisioner. The class needs no StorageClass object for static binding."""
    name = f"kubetune-e2e-{_suffix()}"
    cluster.apply({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "storageClassName": name,
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            # Never mounted: kwok runs no kubelet.
            "hostPath": {"path": f"/tmp/{name}"},
        },
    })
    yield name
    cluster.kubectl("delete", "pv", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.mark.parametrize("mode", ["namespaced", "cluster_wide"])
def test_operator_with_only_the_chart_service_account_runs_a_job_to_ready(
    cluster: Cluster, mode: str, storage_class: str, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The strongest proof that the RBAC is enough: the whole lifecycle, as that identity, in
    a namespace that enforces the restricted Pod Security profile, in both RBAC modes. The
    job names a Secret: namespaced, the operator checks it exists; cluster-wide, where it may
    not read Secrets, it leaves that to the kubelet."""
    release: Release = request.getfixturevalue(mode)
    if release.watched:
        [watched] = release.watched
    else:
        watched = create_namespace(cluster, f"anywhere-{_suffix()}", RESTRICTED)
        request.addfinalizer(lambda: delete_namespaces(cluster, watched))
    cluster.kubectl("create", "secret", "generic", "hf-token", "-n", watched,
                    "--from-literal=token=not-a-real-token")
    report = {"steps": 8, "trainLoss": "1.25", "evalLoss": "1.5", "baseEvalLoss": "2.0",
              "tokensPerSecond": "100"}
    job = _quick_job("rbac-proof")
    job["spec"]["model"]["secretRef"] = {"name": "hf-token"}
    job["spec"]["storage"] = {"size": "1Gi", "storageClassName": storage_class}
    job["metadata"]["annotations"] = {
        "kubetune.io/pod-metadata": json.dumps(
            {"train": {"annotations": {TERMINATION_MESSAGE: json.dumps(report)}}}
        )
    }
    kubeconfig = service_account_kubeconfig(cluster, release, tmp_path / "sa.kubeconfig")
    log = tmp_path / "operator.log"

    with operator_process(cluster, release, kubeconfig, log) as process:
        cluster.kubectl("apply", "-n", watched, "-f", "-", input=json.dumps(job))

        def ready_job() -> dict[str, Any] | None:
            if 'User "system:anonymous"' in log.read_text(errors="replace"):
                pytest.fail(ANONYMOUS_CLIENT)
            current = cluster.get("finetunejob", "rbac-proof", watched)
            return current if current and has_condition("Ready")(current) else None

        try:
            ready = wait_for(ready_job, timeout=150, what="FineTuneJob rbac-proof Ready",
                             interval=0.5)
        except TimeoutError:
            text = log.read_text(errors="replace")
            current = cluster.get("finetunejob", "rbac-proof", watched)
            pytest.fail(
                f"not Ready; status: {json.dumps((current or {}).get('status'), indent=1)}\n"
                f"operator exit code: {process.poll()}\noperator log:\n{text[-6000:]}"
            )
        assert process.poll() is None, "the operator exited"

    lines = log.read_text(errors="replace").splitlines()
    forbidden = [line for line in lines if "403" in line or "forbidden" in line.lower()]
    assert forbidden == [], "calls the chart's RBAC does not allow:\n" + "\n".join(forbidden)
    scanning = [line for line in lines if any(scan in line for scan in KOPF_SCANNING)]
    assert scanning == [], "kopf scanned the cluster:\n" + "\n".join(scanning)
    assert ready["status"]["serving"]["endpoint"].startswith("http://")
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]
    assert argocd_health(ready) == "Healthy"
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", watched, "-o", "json").stdout)
    components = {j["metadata"]["labels"]["app.kubernetes.io/component"] for j in jobs["items"]}
    assert components == {"trainer", "exporter"}
    # The data plane runs as the chart's token-less ServiceAccounts.
    deployments = json.loads(
        cluster.kubectl("get", "deployments", "-n", watched, "-o", "json").stdout
    )
    accounts = {
        item["metadata"]["labels"]["app.kubernetes.io/component"]:
            item["spec"]["template"]["spec"].get("serviceAccountName")
        for item in [*jobs["items"], *deployments["items"]]
    }  # fmt: skip
    expected_accounts = {
        "namespaced": {"trainer": "kubetune-trainer", "exporter": "kubetune-trainer",
                       "server": "kubetune-serving"},
        # The chart cannot create ServiceAccounts everywhere: the namespace's `default`.
        "cluster_wide": {"trainer": None, "exporter": None, "server": None},
    }  # fmt: skip
    assert accounts == expected_accounts[mode]
    # The Secret reaches the trainer by reference only, in both modes.
    [train] = [j for j in jobs["items"]
               if j["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"]
            for c in train["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert "hf-token" in refs
