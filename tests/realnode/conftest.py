"""Fixtures for the real-node tier: real pods on a real kubelet node.

One control plane per test session with one real node beside kwok's fake GPU nodes
(`hack/cluster.py up --real-node`): kubelet + containerd + CNI bridge + kube-proxy + CoreDNS.
KubeTune's images are built without Docker (`hack/images.py`, cached by content) and imported
into the node's containerd. Nothing on this node is faked: no kwok stage touches its pods.

Needs root on Linux (containerd, iptables, cgroups); elsewhere the tier is skipped with the
reason, as the e2e tier is without its binaries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = ROOT / "hack"
if str(HACK_DIR) not in sys.path:
    sys.path.insert(0, str(HACK_DIR))

import cluster as controlplane  # noqa: E402  (hack/ is not a package; found via sys.path)
import realnode  # noqa: E402

TIER_DIR = Path(__file__).resolve().parent
# The node, the control plane and the pause image import; the first build of the binaries
# is hack/build-control-plane.sh's and happens before this clock starts.
UP_TIMEOUT = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TIER_DIR in item.path.parents:
            item.add_marker(pytest.mark.realnode)


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.Cluster]:
    reason = controlplane.unavailable_reason() or realnode.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("realnode")
    with controlplane.running(
        workdir, die_with_parent=True, real_node=True, timeout=UP_TIMEOUT
    ) as running_cluster:
        yield running_cluster
    # `down` has run: the host must be as it was. An error here fails the session.
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


@pytest.fixture(scope="session")
def images(real_cluster: controlplane.Cluster) -> Images:
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
