"""The progress endpoint's authentication against the real control plane: kube-apiserver's
TokenReview, the Job controller's ownerReferences, kwok's pods. No mocks.

What each test proves, in the API server's own terms:
- a pod's default ServiceAccount token (the API server's audience, which kube-apiserver
  itself accepts) is refused: only KubeTune's audience check stands in its way;
- a pod that copies a trainer's labels but was not created by the FineTuneJob's Job is
  refused (labels bind nothing);
- a previous generation's pod is refused once the spec trains a new generation;
- 500 bad tokens cost the API server a handful of TokenReviews, counted by kube-apiserver's
  own `apiserver_request_total`, and the job's own pod keeps reporting.

The operator runs with a small per-source budget (`--progress-source-review-burst`, a rate
that earns nothing within a test), so the bound on TokenReviews is exact, not a timing.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster

from .operator_harness import (
    REPORT,
    OperatorProcess,
    finetunejob,
    pod_token,
    post_progress,
    running_operator,
    succeed,
    wait_ftj,
    wait_items,
)

AUDIENCE = "kubetune.io/progress"
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
SOURCE_BURST = 12
REPORT_BODY = {"step": 30, "totalSteps": 120, "trainLoss": 1.4}


class BudgetedOperator(OperatorProcess):
    """The harness's operator, with a per-source TokenReview budget the tests can count on:
    `SOURCE_BURST` reviews for 127.0.0.1 (every request here comes from it), then one per
    ~17 minutes."""

    def argv(self, *extra: str) -> list[str]:
        budget = ("--progress-source-review-burst", str(SOURCE_BURST),
                  "--progress-source-review-rate", "0.001")  # fmt: skip
        return super().argv(*budget, *extra)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_operator(cluster, tmp_path_factory.mktemp("operator"), BudgetedOperator) as op:
        yield op


def _running_trainer(cluster: Cluster, ns: str, name: str, generation: int = 1) -> dict[str, Any]:
    selector = (
        f"kubetune.io/job={name},app.kubernetes.io/component=trainer,"
        f"kubetune.io/generation={generation}"
    )
    return wait_items(
        cluster, "pods", ns, selector,
        lambda ps: len(ps) == 1 and ps[0]["status"].get("phase") == "Running",
        timeout=90,
    )[0]  # fmt: skip


def _token_reviews_seen_by_the_api_server(cluster: Cluster) -> int:
    """TokenReviews kube-apiserver has answered since it started, from its own metrics."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="tokenreviews"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _operator_metric(operator: OperatorProcess, name: str) -> float | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{operator.progress_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_a_pods_default_token_and_a_forged_trainer_pod_are_refused(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    cluster.apply(finetunejob("mine", ns, train=succeed("120s", REPORT)))
    trainer = _running_trainer(cluster, ns, "mine")
    pod_name = trainer["metadata"]["name"]

    # Every pod can get this token: the API server's own audience, bound to the pod. The
    # API server accepts it (for itself); KubeTune must not.
    default_token = cluster.kubectl(
        "create", "token", "default", "-n", ns, "--bound-object-kind", "Pod",
        "--bound-object-name", pod_name, "--duration", "10m",
    ).stdout.strip()  # fmt: skip
    assert post_progress(operator.progress_url, ns, "mine", default_token, REPORT_BODY) == 401

    # A pod anyone with `create pods` can make: all of the trainer's labels, no owner.
    labels = dict(trainer["metadata"]["labels"])
    assert labels["kubetune.io/job"] == "mine"
    forged_name = f"forged-{uuid.uuid4().hex[:6]}"
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": forged_name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
        }
    )
    forged_token = pod_token(cluster, ns, forged_name, AUDIENCE)
    assert post_progress(operator.progress_url, ns, "mine", forged_token, REPORT_BODY) == 403

    token = pod_token(cluster, ns, pod_name, AUDIENCE)
    assert post_progress(operator.progress_url, ns, "mine", token, REPORT_BODY) == 202
    mine = wait_ftj(
        cluster, ns, "mine", lambda o: (o["status"].get("progress") or {}).get("step") == 30
    )
    assert mine["status"]["progress"]["trainLoss"] == "1.4"


def test_a_previous_generations_pod_is_refused_once_a_new_generation_starts(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    cluster.apply(finetunejob("gens", ns, train=succeed("300s", REPORT)))
    old_pod = _running_trainer(cluster, ns, "gens", generation=1)
    old_token = pod_token(cluster, ns, old_pod["metadata"]["name"], AUDIENCE)
    assert post_progress(operator.progress_url, ns, "gens", old_token, REPORT_BODY) == 202

    # A new learning rate trains a different model: generation 2.
    patch = {"spec": {"training": {"learningRate": "5e-4"}}}
    cluster.kubectl("patch", "ftj", "gens", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    new_pod = _running_trainer(cluster, ns, "gens", generation=2)
    # Generation 2 has started once status records it: until that patch lands, generation 1
    # is still the recorded one, whose reports are kept (it trains on while an invalid edit
    # stands, and a valid edit's pass has not yet been written).
    wait_ftj(cluster, ns, "gens",
             lambda o: (o["status"].get("training") or {}).get("generation") == 2)  # fmt: skip

    assert post_progress(operator.progress_url, ns, "gens", old_token, {"step": 99}) == 409
    new_token = pod_token(cluster, ns, new_pod["metadata"]["name"], AUDIENCE)
    assert post_progress(operator.progress_url, ns, "gens", new_token, {"step": 3}) == 202
    progress = wait_ftj(
        cluster, ns, "gens", lambda o: (o["status"].get("progress") or {}).get("step") == 3
    )["status"]["progress"]
    assert progress["step"] == 3


def test_500_bad_tokens_cost_at_most_the_source_budget_in_token_reviews(
    cluster: Cluster, ns: str, operator: OperatorProcess
) -> None:
    cluster.apply(finetunejob("flooded", ns, train=succeed("300s", REPORT)))
    trainer = _running_trainer(cluster, ns, "flooded")
    token = pod_token(cluster, ns, trainer["metadata"]["name"], AUDIENCE)
    assert post_progress(operator.progress_url, ns, "flooded", token, REPORT_BODY) == 202
    before = _token_reviews_seen_by_the_api_server(cluster)
    counted_before = _operator_metric(operator, "kubetune_progress_tokenreviews_total")

    bad = ["one-bad-token"] * 250 + [f"bad-token-{uuid.uuid4().hex}" for _ in range(250)]
    codes = Counter(post_progress(operator.progress_url, ns, "flooded", t, {}) for t in bad)

    reviews = _token_reviews_seen_by_the_api_server(cluster) - before
    counted = _operator_metric(operator, "kubetune_progress_tokenreviews_total")
    # At most what is left of the source's burst (earlier tests in this module spent some);
    # the repeated token is reviewed once, the rest is throttled with 429.
    assert 1 <= reviews <= SOURCE_BURST, codes
    assert counted is not None and counted_before is not None
    assert counted - counted_before == reviews
    assert codes[401] >= 250 and codes[429] >= 500 - 250 - SOURCE_BURST
    assert set(codes) == {401, 429}
    # The job's own pod, verified before, is not throttled by the flood.
    assert post_progress(operator.progress_url, ns, "flooded", token, {"step": 31}) == 202


class ChartIdentityOperator(BudgetedOperator):
    """The budgeted operator authenticated as the chart's operator ServiceAccount (its token
    in a kubeconfig), holding the Lease the chart's Role grants, in the release namespace."""

    kubeconfig: Path
    lease_namespace: str

    def argv(self, *extra: str) -> list[str]:
        argv = super().argv(*extra)
        argv[argv.index("--kubeconfig") + 1] = str(self.kubeconfig)
        argv[argv.index("--lease-namespace") + 1] = self.lease_namespace
        return argv


def test_the_charts_rbac_is_enough_for_the_progress_endpoint(
    cluster: Cluster, ns: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """TokenReview, the token's pod, its Job and the FineTuneJob, read as the chart's own
    identity: no call the chart's ClusterRole does not grant. Runs last: it stands in for
    the module's operator (two cluster-wide operators would both act on every job)."""
    release = f"kubetune-pa{uuid.uuid4().hex[:6]}"
    home = f"{release}-system"
    cluster.kubectl("create", "namespace", home)
    rbac = cluster.helm(
        "template", release, str(CHART), "-n", home, "--kube-version", "1.36.4",
        "--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccounts.yaml",
    ).stdout  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=rbac)
    identity = ChartIdentityOperator(cluster, tmp_path)
    identity.kubeconfig = cluster.token_kubeconfig(f"{release}-operator", home, tmp_path / "sa")
    identity.lease_namespace = home
    operator.stop()
    try:
        identity.start()
        cluster.apply(finetunejob("charted", ns, train=succeed("120s", REPORT)))
        trainer = _running_trainer(cluster, ns, "charted")
        token = pod_token(cluster, ns, trainer["metadata"]["name"], AUDIENCE)
        assert post_progress(identity.progress_url, ns, "charted", token, REPORT_BODY) == 202
        wait_ftj(cluster, ns, "charted",
                 lambda o: (o["status"].get("progress") or {}).get("step") == 30)  # fmt: skip
    finally:
        identity.stop()
        cluster.kubectl("delete", "-f", "-", "--wait=false", input=rbac, check=False)
        cluster.kubectl("delete", "namespace", home, "--wait=false", check=False)
        operator.start()
    log = identity.logs()
    forbidden = [line for line in log.splitlines() if "403" in line or "forbidden" in line]
    assert forbidden == [], "\n".join(forbidden)
