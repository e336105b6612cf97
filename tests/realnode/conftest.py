"""Fixtures for the real-node tier: real pods on a real kubelet node.

One control plane for the tier with one real node beside kwok's fake GPU nodes
(`hack/cluster.py up --real-node`): kubelet + containerd + CNI bridge + kube-proxy + CoreDNS.
KubeTune's images are built without Docker (`hack/images.py`, cached by content) and imported
into the node's containerd. Nothing on this node is faked: no kwok stage touches its pods.
Debian's Prometheus (`monitoring`) scrapes what the chart's ServiceMonitor and PodMonitor
select, translated by hack/prometheus.py, and evaluates the chart's alert rules.

The cluster is package-scoped: it stops after the tier's last test, so the trainer and unit
tiers do not share the two cores with its kubelet, containerd and control plane.

Needs root on Linux (containerd, iptables, cgroups); elsewhere the tier is skipped with the
reason, as the e2e tier is without its binaries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = ROOT / "hack"
if str(HACK_DIR) not in sys.path:
    sys.path.insert(0, str(HACK_DIR))

import cluster as controlplane  # noqa: E402  (hack/ is not a package; found via sys.path)
import prometheus as promserver  # noqa: E402
import realnode  # noqa: E402

TIER_DIR = Path(__file__).resolve().parent
CHART = ROOT / "charts" / "kubetune"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
STORAGE_CLASS = "kubetune-realnode"
# The node, the control plane and the pause image import; the first build of the binaries
# is hack/build-control-plane.sh's and happens before this clock starts.
UP_TIMEOUT = 300
TEST_TIMEOUT = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TIER_DIR in item.path.parents:
            item.add_marker(pytest.mark.realnode)
            # The first test also waits for the tier's fixtures: on a new machine that is
            # the images' first build (minutes) as well as the node.
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(scope="package")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.Cluster]:
    reason = controlplane.unavailable_reason() or realnode.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("realnode")
    with controlplane.running(
        workdir, die_with_parent=True, real_node=True, timeout=UP_TIMEOUT
    ) as running_cluster:
        yield running_cluster
    # `down` has run: the host must be as it was. An error here fails the tier.
    layout = realnode.NodeLayout(workdir=workdir, cache=realnode.cache_dir())
    left = realnode.leftovers(layout)
    assert not left, f"the real node's down left {left}"


@dataclass(frozen=True)
class Image:
    repository: str
    tag: str

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True)
class Images:
    operator: Image
    trainer: Image


@pytest.fixture(scope="package")
def images(real_cluster: controlplane.Cluster) -> Images:
    return import_images(real_cluster)


def import_images(real_cluster: controlplane.Cluster) -> Images:
    """KubeTune's images, built (or taken from the cache) and imported into the node."""
    layout = realnode.NodeLayout(workdir=real_cluster.workdir, cache=realnode.cache_dir())
    result = subprocess.run(
        [sys.executable, str(HACK_DIR / "images.py"), "import",
         "--address", str(layout.containerd_socket)],
        stdout=subprocess.PIPE, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"hack/images.py import failed:\n{result.stdout[-4000:]}"
    built = json.loads(result.stdout.strip().splitlines()[-1])

    def image(name: str) -> Image:
        repository, tag = built[name]["ref"].rsplit(":", 1)
        return Image(repository.removeprefix("docker.io/"), tag)

    return Images(operator=image("operator"), trainer=image("trainer"))


def create_namespace(cluster: controlplane.Cluster, name: str) -> str:
    cluster.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}
    )
    cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=name, timeout=30)
    return name


def host_path_volume(cluster: controlplane.Cluster, name: str) -> None:
    """A PersistentVolume on the node's disk that the artifact PVC binds to (no provisioner).

    World-writable: a hostPath volume does not get the pod's fsGroup, and the data plane runs
    as UID 1000.
    """
    path = cluster.workdir / "volumes" / name
    path.mkdir(parents=True)
    path.chmod(0o777)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "storageClassName": STORAGE_CLASS,
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
    )


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    watched: str


@pytest.fixture(scope="package")
def release(real_cluster: controlplane.Cluster, images: Images) -> Iterator[Release]:
    installed = install_chart(real_cluster, images)
    yield installed
    real_cluster.helm("uninstall", "kubetune", "-n", installed.namespace, "--wait", check=False)


def install_chart(real_cluster: controlplane.Cluster, images: Images) -> Release:
    """The chart installed as a user would, with the images `make images` built, in a
    namespace of its own and watching one other (both `restricted`)."""
    suffix = uuid.uuid4().hex[:6]
    system = create_namespace(real_cluster, f"kubetune-system-{suffix}")
    watched = create_namespace(real_cluster, f"tune-{suffix}")
    sets = {
        "operator.image.repository": images.operator.repository,
        "operator.image.tag": images.operator.tag,
        "operator.image.pullPolicy": "Never",
        "trainer.image.repository": images.trainer.repository,
        "trainer.image.tag": images.trainer.tag,
        "trainer.image.pullPolicy": "Never",
        "watch.namespaces": "{" + watched + "}",
    }
    args = ["install", "kubetune", str(CHART), "-n", system, "--wait", "--timeout", "180s"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    real_cluster.helm(*args)
    return Release("kubetune", system, watched)


# Scrapes and rule evaluations every 2 s, so a tier of minutes has a dense loss curve and the
# serving series of a short rollout.
SCRAPE_INTERVAL = "2s"


@dataclass(frozen=True)
class Monitoring:
    """The tier's Prometheus, scraping what the chart's monitors select."""

    prometheus: promserver.Prometheus
    discovery: promserver.Discovery
    started_at: float
    """Unix time Prometheus started: the start of every query_range over the tier."""
    rules: dict[str, list[str]]
    """The alert rules the chart's PrometheusRule renders: their names by group."""

    def diagnosis(self) -> str:
        """What a failing check prints: the discovery's errors and Prometheus' log."""
        errors = "\n".join(self.discovery.errors[-10:]) or "(none)"
        return (f"discovery errors:\n{errors}\nprometheus log "
                f"({self.prometheus.record.log}):\n{self.prometheus.log_tail()}")  # fmt: skip


def render_monitoring(cluster: controlplane.Cluster, release: Release) -> list[dict[str, Any]]:
    """The chart's ServiceMonitor, PodMonitor and PrometheusRule for `release`, rendered as on
    a cluster with the Prometheus Operator's API. The installed release has none (no CRDs
    here), and keeps its values as a user's: these are only for the translation."""
    node_ip = urllib.parse.urlparse(cluster.server).hostname
    monitor = {"enabled": True, "interval": SCRAPE_INTERVAL, "scrapeTimeout": SCRAPE_INTERVAL}
    values = {
        "watch": {"namespaces": [release.watched]},
        "metrics": {"serviceMonitor": monitor, "servingMonitor": monitor,
                    "rules": {"enabled": True}},
        # The chart refuses a monitor its NetworkPolicy would drop: the scraper is the host.
        "networkPolicy": {"metricsFrom": [{"ipBlock": {"cidr": f"{node_ip}/32"}}]},
    }  # fmt: skip
    # `helm template` does not ask the cluster: it is told its version and the monitors' API.
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    rendered = cluster.helm(
        "template", release.name, str(CHART), "-n", release.namespace,
        "--kube-version", server["gitVersion"], "--api-versions", promserver.MONITORING_API,
        "-f", "-", input=yaml.safe_dump(values),
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.fixture(scope="package")
def monitoring(real_cluster: controlplane.Cluster, release: Release) -> Iterator[Monitoring]:
    """Debian's Prometheus scraping the operator and the inference pods as the chart's
    monitors say (hack/prometheus.py), evaluating the chart's alert rules; stopped at the
    end of the tier. A test that needs the series from a job's start requests it first."""
    if promserver.find_prometheus() is None:
        pytest.fail("prometheus not found: hack/install-promtool.sh installs Debian's package")
    manifests = render_monitoring(real_cluster, release)
    home = real_cluster.workdir / "prometheus"
    rules = home / "rules.yaml"
    home.mkdir(parents=True, exist_ok=True)
    groups = promserver.rule_groups(manifests)
    rules.write_text(yaml.safe_dump(groups, sort_keys=False))
    discovery = promserver.Discovery(real_cluster.kubeconfig, home / "discovery")
    scrape = promserver.served_by(
        promserver.scrape_configs(manifests, real_cluster.kubeconfig), discovery.url
    )
    started_at = time.time()
    try:
        running = promserver.start(
            real_cluster.workdir, promserver.config(scrape, [rules], SCRAPE_INTERVAL)
        )
    except BaseException:
        discovery.close()
        raise
    rendered_rules = {group["name"]: [rule["alert"] for rule in group["rules"]]
                      for group in groups["groups"]}  # fmt: skip
    watched = Monitoring(running, discovery, started_at, rendered_rules)
    try:
        yield watched
        # Prometheus must have lived through the tier: a crash shows here, with its log.
        controlplane.check_alive([running.record])
    finally:
        promserver.stop(running)
        discovery.close()


def condition(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c["type"] == kind and c["status"] == "True"
        for c in obj.get("status", {}).get("conditions", [])
    )


def serves_alone(cluster: controlplane.Cluster, namespace: str, job: str, generation: int) -> bool:
    """`generation` serves alone: status says so, the job is Ready, and the Deployment has one
    replica, updated (the previous generation's pod is gone)."""
    obj = cluster.get("finetunejob", job, namespace) or {}
    replicas = (cluster.get("deployment", f"{job}-server", namespace) or {}).get("status", {})
    return (
        (obj.get("status", {}).get("serving") or {}).get("modelGeneration") == generation
        and condition(obj, "Ready")
        and replicas.get("updatedReplicas") == 1
        and replicas.get("replicas") == 1
    )


def describe(cluster: controlplane.Cluster, release: Release, job_name: str) -> str:
    """What a failing wait prints: the job's status, the pods, the operator's log tail."""
    ns = release.watched
    job = cluster.get("finetunejob", job_name, ns) or {}
    pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", ns, check=False).stdout[-3000:]
    log = cluster.kubectl(
        "logs", "-n", release.namespace, "deployment/kubetune-operator", "--tail=60", check=False
    ).stdout
    trainers = cluster.kubectl(
        "logs", "-n", ns, "-l", "app.kubernetes.io/component=trainer", "--tail=30",
        "--prefix", check=False,
    ).stdout  # fmt: skip
    return (
        f"status: {json.dumps(job.get('status'), indent=1)}\npods:\n{pods}\n"
        f"trainer logs:\n{trainers}\n"
        f"events:\n{events}\noperator log:\n{log}"
    )


def delete_job(cluster: controlplane.Cluster, namespace: str, name: str) -> None:
    """Delete a FineTuneJob and wait for its pods to go: the node's 2 CPUs are shared by the
    tier's tests, and a server pod left running would keep the next job's pods Pending."""
    cluster.kubectl("delete", "finetunejob", name, "-n", namespace, "--ignore-not-found")
    controlplane.wait_for(
        lambda: not cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"kubetune.io/job={name}", "-o", "name"
        ).stdout.strip(),
        timeout=120,
        what=f"the pods of {name} gone",
    )
