"""The real node itself: pods run, and pod IPs, Service ClusterIPs and cluster DNS work from the
host and from a pod, in a namespace that enforces the `restricted` Pod Security level."""

from __future__ import annotations

import socket
import struct
import urllib.request
import uuid

import pytest
from cluster import Cluster, wait_for
from realnode import NODE_NAME

from .conftest import Images

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
PORT = 8000


def restricted_pod(name: str, image: str, command: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
                }
            ],
        },
    }


def dns_a_record(server: str, name: str) -> str:
    """The first A record for `name` from the DNS server at `server`:53 (one UDP query)."""
    query = struct.pack(">HHHHHH", 0x4B54, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(query, (server, 53))
        reply = sock.recv(512)
    assert reply[3] & 0x0F == 0, f"{name}: DNS rcode {reply[3] & 0x0F}"
    assert struct.unpack(">H", reply[6:8])[0] >= 1, f"{name}: no answer"
    return socket.inet_ntoa(reply[-4:])


def get(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return int(response.status)


@pytest.fixture
def restricted_ns(real_cluster: Cluster) -> str:
    name = f"rn-{uuid.uuid4().hex[:6]}"
    real_cluster.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}
    )
    real_cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=name, timeout=30)
    return name


def test_pods_services_and_dns(real_cluster: Cluster, images: Images, restricted_ns: str) -> None:
    ns = restricted_ns
    server = restricted_pod("web", images.operator.ref, ["python", "-m", "http.server", str(PORT)])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": PORT}]},
    }
    # The client only sleeps; the test execs into it.
    client = restricted_pod("client", images.operator.ref, ["sleep", "600"])
    del client["spec"]["containers"][0]["readinessProbe"]  # type: ignore[index]
    real_cluster.kubectl("apply", "-n", ns, "-f", "-", input=_yaml(server, service, client))
    pod = real_cluster.wait_for(
        "pod", "web", lambda p: _ready(p), namespace=ns, timeout=120, what="pod web Ready"
    )
    assert pod["spec"]["nodeName"] == NODE_NAME
    real_cluster.wait_for("pod", "client", _running, namespace=ns, timeout=120)

    # From the host: the pod's IP, the Service's ClusterIP (kube-proxy) and its DNS name.
    assert get(f"http://{pod['status']['podIP']}:{PORT}/") == 200
    cluster_ip = real_cluster.get("service", "web", ns)["spec"]["clusterIP"]  # type: ignore[index]
    assert wait_for(lambda: get(f"http://{cluster_ip}/") == 200, timeout=30, what="ClusterIP")
    node_ip = real_cluster.server.removeprefix("https://").rsplit(":", 1)[0]
    assert dns_a_record(node_ip, f"web.{ns}.svc.cluster.local") == cluster_ip

    # From a pod: cluster DNS by short name (the pod's search path) and the Service.
    fetch = "import urllib.request as u; print(u.urlopen('http://web/', timeout=5).status)"
    out = real_cluster.kubectl("exec", "-n", ns, "client", "--", "python", "-c", fetch)
    assert out.stdout.strip() == "200"
    # And the apiserver through the `kubernetes` Service, as an in-cluster client reaches it.
    readyz = (
        "import ssl, urllib.request as u; c = ssl._create_unverified_context();"
        "print(u.urlopen('https://kubernetes.default.svc/readyz', context=c, timeout=5).status)"
    )
    out = real_cluster.kubectl("exec", "-n", ns, "client", "--", "python", "-c", readyz)
    assert out.stdout.strip() == "200"


def _ready(pod: dict[str, object]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])  # type: ignore[attr-defined]
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _running(pod: dict[str, object]) -> bool:
    return pod.get("status", {}).get("phase") == "Running"  # type: ignore[attr-defined]


def _yaml(*docs: object) -> str:
    import yaml

    return yaml.safe_dump_all(list(docs))
