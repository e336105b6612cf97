"""Fixtures for the e2e tier: a real control plane on loopback (see hack/cluster.py).

The control plane starts once for the tier and stops after its last test (package scope), so
the tiers after it do not share the two cores with an idle etcd, apiserver and kwok. Its first
start may build the binaries with Go (tens of minutes); later runs reuse the cache. Without Go
and without cached binaries the e2e tests are skipped with the reason.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HACK_DIR = Path(__file__).resolve().parents[2] / "hack"
if str(HACK_DIR) not in sys.path:
    sys.path.insert(0, str(HACK_DIR))

import cluster as controlplane  # noqa: E402  (hack/ is not a package; found via sys.path)

from .operator_harness import OperatorProcess, make_claim, running_operator  # noqa: E402

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test under tests/e2e is e2e, so `-m "not e2e"` deselects the whole tier.
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.Cluster]:
    reason = controlplane.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("controlplane")
    with controlplane.running(workdir, die_with_parent=True) as running_cluster:
        yield running_cluster


@pytest.fixture
def namespace(cluster: controlplane.Cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are rejected by the ServiceAccount admission plugin until `default` exists.
    cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=name, timeout=30)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    cluster: controlplane.Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One `kubetune operator` per test module (a module may override it, e.g. with flags)."""
    with running_operator(cluster, tmp_path_factory.mktemp("operator")) as process:
        yield process


@pytest.fixture
def ns(cluster: controlplane.Cluster, namespace: str, operator: OperatorProcess) -> str:
    """A fresh namespace with the `shared` claim, watched by the module's operator."""
    make_claim(cluster, namespace)
    return namespace
