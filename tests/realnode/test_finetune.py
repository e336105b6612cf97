"""A FineTuneJob run for real: the chart's operator pod, a trainer pod that trains the built-in
model on the CPU, an export Job, an inference Deployment that becomes Ready through its
readiness probe, and a rollout to a second generation under a steady stream of requests.

Everything runs as pods on the real node in namespaces that enforce the `restricted` Pod
Security level; the operator is the chart's, installed with `helm install` as a user would.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from cluster import Cluster, wait_for
from realnode import NODE_NAME

from .conftest import STORAGE_CLASS, Release, condition, delete_job, describe, host_path_volume

MAX_STEPS = 30
JOB = "kubectl-tuned"
# The node has 2 CPUs: the operator (100m), a trainer (1000m) and an inference pod (900m)
# fit at once, and so do two inference pods during a rollout (a surge pod that did not fit
# would stall it: `maxUnavailable: 0`).
JOB_SPEC: dict[str, Any] = {
    "model": {"source": "builtin://smollm2-135m-instruct"},
    "dataset": {"source": "builtin://kubectl-commands"},
    "method": "LoRA",
    "training": {
        "maxSteps": MAX_STEPS,
        "learningRate": "1e-3",
        "batchSize": 4,
        "maxSeqLength": 128,
        "logEverySteps": 2,
    },
    "resources": {"gpusPerNode": 0, "cpu": "1000m", "memory": "6Gi"},
    "storage": {"size": "2Gi", "storageClassName": STORAGE_CLASS},
    "serving": {
        "precision": "INT4",
        "device": "CPU",
        "resources": {"cpu": "900m", "memory": "2Gi"},
    },
}
# The built-in dataset's system message: the fine-tune answers it with one kubectl command.
SYSTEM = "Answer with one kubectl command."
PROMPT = "List all pods in the namespace staging."


def messages(content: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


@dataclass
class Load:
    """A client sending chat completions to the Service without pause, from threads (the
    server batches concurrent requests)."""

    url: str
    model: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self) -> None:
        body = {
            "model": self.model,
            "messages": messages(PROMPT),
            "max_tokens": 1,
        }
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as response:
                answer = json.loads(response.read())
            with self._lock:
                self.ok += 1
                self.models.add(answer["model"])
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            with self._lock:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")

    def run(self) -> None:
        while not self._stop.is_set():
            self.one()

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self.run, daemon=True) for _ in range(8)]
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.seconds = time.monotonic() - self._started


def chat(url: str, model: str, content: str, max_tokens: int = 48) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": messages(content),
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_job_trains_serves_and_rolls_to_a_new_generation_without_downtime(
    real_cluster: Cluster, release: Release, request: pytest.FixtureRequest
) -> None:
    cluster, ns = real_cluster, release.watched
    request.addfinalizer(lambda: delete_job(cluster, ns, JOB))
    host_path_volume(cluster, f"{ns}-{JOB}")
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB, "namespace": ns},
        "spec": JOB_SPEC,
    }
    applied_at = time.monotonic()
    cluster.apply(manifest)

    # Progress arrives while the trainer pod runs: real steps and loss, sent by the trainer to
    # the operator's progress endpoint (a Job's pods report nothing else before they end).
    seen_steps: set[int] = set()

    def training_progress() -> dict[str, Any] | None:
        job = cluster.get("finetunejob", JOB, ns) or {}
        progress = job.get("status", {}).get("progress") or {}
        step = progress.get("step", 0)
        if 0 < step < MAX_STEPS and progress.get("trainLoss"):
            seen_steps.add(step)
        return job if condition(job, "Ready") else None

    try:
        ready = wait_for(training_progress, timeout=1200, what=f"{JOB} Ready", interval=1)
    except TimeoutError:
        pytest.fail(describe(cluster, release, JOB))
    apply_to_ready = time.monotonic() - applied_at
    print(f"apply to Ready: {apply_to_ready:.0f} s")
    assert seen_steps, "no progress report reached status while training"
    status = ready["status"]
    assert status["progress"]["step"] == MAX_STEPS
    assert float(status["progress"]["trainLoss"]) > 0
    assert status["serving"]["modelGeneration"] == 1

    # Every pod ran on the real node, and the server is Ready through its own probe.
    pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}
    deployment = cluster.get("deployment", f"{JOB}-server", ns)
    assert deployment and deployment["status"].get("readyReplicas") == 1

    service = cluster.get("service", f"{JOB}-server", ns)
    assert service is not None
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    answer = chat(url, JOB, PROMPT)
    assert answer["model"] == JOB
    text = answer["choices"][0]["message"]["content"]
    # The built-in dataset teaches one kubectl command per request, nothing else.
    assert text.strip().startswith("kubectl get pods"), text

    # Generation 2: a spec change retrains; the Deployment rolls while a client keeps asking.
    with Load(url, JOB) as load:
        time.sleep(3)
        cluster.kubectl(
            "patch", "finetunejob", JOB, "-n", ns, "--type=merge",
            "-p", json.dumps({"spec": {"training": {"learningRate": "8e-4"}}}),
        )  # fmt: skip

        def rolled() -> dict[str, Any] | None:
            job = cluster.get("finetunejob", JOB, ns) or {}
            serving = job.get("status", {}).get("serving") or {}
            deployment = cluster.get("deployment", f"{JOB}-server", ns) or {}
            done = (
                serving.get("modelGeneration") == 2
                and condition(job, "Ready")
                and deployment.get("status", {}).get("updatedReplicas") == 1
                and deployment.get("status", {}).get("replicas") == 1
            )
            return job if done else None

        try:
            rolled_job = wait_for(rolled, timeout=1200, what="generation 2 served", interval=1)
        except TimeoutError:
            pytest.fail(describe(cluster, release, JOB))
        time.sleep(3)
    rate = (load.ok + len(load.failures)) / load.seconds
    print(f"rollout load: {load.ok} ok, {len(load.failures)} failed, {rate:.1f} requests/s")
    assert load.failures == [], load.failures[:10]
    assert rate >= 10, f"the client sent only {rate:.1f} requests/s"
    assert load.models == {JOB}
    assert rolled_job["status"]["serving"]["modelGeneration"] == 2
    assert chat(url, JOB, PROMPT)["model"] == JOB
