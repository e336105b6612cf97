"""The operator as a real process against the e2e control plane, plus helpers for its tests.

`kubetune operator` runs as a subprocess (`python -m kubetune.cli operator ...`) with the
cluster's admin kubeconfig, exactly as a user would start it outside a cluster. kwok pods run
nothing, so each test tells kwok how the operator's pods end through the
`kubetune.io/pod-metadata` annotation (honoured because the operator runs with
`--allow-pod-metadata`): completion delays, termination messages (the trainer's report),
failure labels and exit codes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster import Cluster, wait_for

GPU = "nvidia.com/gpu"
FAIL = "pod-container-running-failed.stage.kwok.x-k8s.io"
DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"
MESSAGE = "kubetune.io/fake-termination-message"
REPORT = {
    "status": "Succeeded",
    "steps": 20,
    "trainLoss": 1.21,
    "evalLoss": 1.05,
    "baseEvalLoss": 1.9,
    "accuracy": 0.8,
    "baseAccuracy": 0.1,
    "tokensPerSecond": 1500.0,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """One `kubetune operator` process; `restart()` replaces it (optionally killed hard)."""

    def __init__(self, cluster: Cluster, workdir: Path, lease_duration: int = 5) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.progress_port = _free_port()
        self.liveness_port = _free_port()
        self.lease_duration = lease_duration
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def progress_url(self) -> str:
        return f"http://127.0.0.1:{self.progress_port}"

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "kubetune.cli", "operator",
            "--kubeconfig", str(self.cluster.kubeconfig),
            "--progress-port", str(self.progress_port),
            "--liveness-port", str(self.liveness_port),
            "--progress-url", self.progress_url,
            "--progress-min-interval", "1",
            "--resync-seconds", "5",
            "--lease-namespace", "default",
            "--lease-duration", str(self.lease_duration),
            "--allow-pod-metadata",
            *extra,
        ]  # fmt: skip

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.cluster.env, "HF_HUB_OFFLINE": "1"},
            )
        wait_for(self._live, timeout=60, what="the operator's liveness endpoint", check=self._alive)

    def _alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited:\n{self.log_path.read_text()[-3000:]}")

    def _live(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, hard: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, hard: bool = False) -> None:
        self.stop(hard=hard)
        self.start()

    def logs(self) -> str:
        return "\n".join(
            (self.workdir / f"operator-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )


@contextlib.contextmanager
def running_operator(
    cluster: Cluster, workdir: Path, process: type[OperatorProcess] = OperatorProcess
) -> Iterator[OperatorProcess]:
    """The CRD installed and `process` (an OperatorProcess, or one with extra flags) running."""
    crd = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "crd"], capture_output=True, text=True, check=True
    ).stdout
    cluster.kubectl("apply", "--server-side", "-f", "-", input=crd)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=30s"
    )
    operator = process(cluster, workdir)
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


# --------------------------------------------------------------------------- manifests


def pod_metadata(
    train: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
    serve: dict[str, Any] | None = None,
) -> str:
    return json.dumps(
        {k: v for k, v in {"train": train, "export": export, "serve": serve}.items() if v}
    )


def succeed(delay: str = "1s", report: dict[str, Any] | None = None) -> dict[str, Any]:
    """kwok: the pod succeeds after `delay` with `report` as its termination message."""
    annotations = {DELAY: delay}
    if report is not None:
        annotations[MESSAGE] = json.dumps(report)
    return {"annotations": annotations}


def fail(exit_code: int, message: str, delay: str = "1s") -> dict[str, Any]:
    return {
        "labels": {FAIL: "true"},
        "annotations": {
            f"{FAIL}/exit-code": str(exit_code),
            f"{FAIL}/reason": "Error",
            f"{FAIL}/message": message,
            f"{FAIL}/delay": delay,
        },
    }


def finetunejob(
    name: str,
    namespace: str,
    *,
    train: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "model": {"source": "builtin://smollm2-135m-instruct"},
        "dataset": {"source": "builtin://kubectl-commands"},
        "resources": {"gpusPerNode": 1, "gpuMemoryGiB": 80},
        "storage": {"claimName": "shared"},
    }
    body_spec.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels or {},
            "annotations": {
                "kubetune.io/pod-metadata": pod_metadata(
                    train=train if train is not None else succeed("2s", REPORT),
                    export=export if export is not None else succeed("1s"),
                )
            },
        },
        "spec": body_spec,
    }


def make_claim(cluster: Cluster, namespace: str, claim: str = "shared") -> None:
    """A PVC pre-bound to a hostPath PV: kwok has no provisioner, and the scheduler does
    not place pods whose claim is unbound."""
    pv = f"pv-{namespace}-{claim}"[:63]
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "hostPath": {"path": f"/tmp/kubetune-e2e/{pv}"},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    if claim == "shared":
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "10Gi"}},
                    "storageClassName": "",
                    "volumeName": pv,
                },
            }
        )


# --------------------------------------------------------------------------- reading


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return {}


def has_condition(
    kind: str, status: str = "True", reason: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    def check(obj: dict[str, Any]) -> bool:
        cond = condition(obj, kind)
        return cond.get("status") == status and (reason is None or cond.get("reason") == reason)

    return check


def wait_ftj(
    cluster: Cluster,
    namespace: str,
    name: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 90,
    what: str = "",
) -> dict[str, Any]:
    return cluster.wait_for(
        "finetunejob", name, until, namespace=namespace, timeout=timeout, what=what
    )


def items(cluster: Cluster, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    result = cluster.kubectl("get", kind, "-n", namespace, "-l", selector, "-o", "json")
    return list(json.loads(result.stdout)["items"])


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    result = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        f"involvedObject.kind=FineTuneJob,involvedObject.name={name}", "-o", "json",
    )  # fmt: skip
    return list(json.loads(result.stdout)["items"])


def wait_items(
    cluster: Cluster,
    kind: str,
    namespace: str,
    selector: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60,
    what: str = "",
) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        found = items(cluster, kind, namespace, selector)
        return found if until(found) else None

    # An empty list is a valid answer for "all gone": wrap it so wait_for sees a truthy value.
    return wait_for(
        lambda: (lambda r: None if r is None else [r])(check()),
        timeout=timeout,
        what=what or f"{kind} -l {selector}",
    )[0]


def post_progress(url: str, namespace: str, name: str, token: str, report: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{url}/v1/progress/{namespace}/{name}",
        data=json.dumps(report).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def pod_token(cluster: Cluster, namespace: str, pod: str, audience: str) -> str:
    """A ServiceAccount token bound to `pod`, as the projected volume would give it."""
    return cluster.kubectl(
        "create", "token", "default", "-n", namespace, "--audience", audience,
        "--bound-object-kind", "Pod", "--bound-object-name", pod, "--duration", "10m",
    ).stdout.strip()  # fmt: skip
