#!/usr/bin/env python3
"""Fleet benchmark: 1,000 FineTuneJobs on one operator, run to completion on the kwok control
plane the e2e tier uses (hack/cluster.py), beside the floor controller of operator_burst.py.

Each job trains and exports with serving off; kwok completes its pods as the e2e tests' jobs
do (`kubetune.io/pod-metadata`: the training pod succeeds after 1 s with a trainer's report,
the export pod after 1 s). Extra fake CPU nodes give the pods room. Measured in one run:

- create-to-training-Job latency (p50, p99) of the whole burst, and the floor controller's on
  a fresh control plane (one watch, the same training Job applied at once, nothing else);
- API requests per job to completion: the operator's own (every aiohttp request it sends is
  counted, as in operator_burst.py) and the API server's `apiserver_request_total` (all
  clients: the operator, the Job controller, the scheduler, kwok, this script's watches);
- writes per job at rest: what the operator sends over `--rest-seconds` once every job has
  finished (goal: none; the resync runs every 10 s);
- the operator's resident memory (VmRSS and its peak, VmHWM) once settled;
- takeover: a second operator waits for the Lease, the first stops (SIGTERM: it releases the
  Lease, as in a rolling update); the time until the new leader has reconciled every job,
  and the writes it sent doing so (goal: none: nothing changed).

    python bench/fleet.py [--jobs 1000] [--rest-seconds 30] [--record] [--no-floor]
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

import cluster as controlplane  # noqa: E402  (hack/ is not a package)
import operator_burst as burst  # noqa: E402  (its counting wrapper, floor and helpers)

NAMESPACE = burst.NAMESPACE
RESULTS = ROOT / "bench" / "RESULTS.md"
FLEET_NODES = 4
PODS_PER_NODE = "1000"
"""Room for every pod of the burst however the scheduler counts finished ones."""
DONE_PHASES = {"Succeeded", "Failed"}
WRITES = ("PATCH", "POST", "PUT", "DELETE")
TRAINER_REPORT = {"status": "Succeeded", "steps": 20, "trainLoss": 1.21, "evalLoss": 1.05,
                  "tokensPerSecond": 1500.0}  # fmt: skip


def finetunejob(name: str) -> dict[str, Any]:
    pods = {
        "train": {"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "1s",
                                  "kubetune.io/fake-termination-message":
                                      json.dumps(TRAINER_REPORT)}},
        "export": {"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "1s"}},
    }  # fmt: skip
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "annotations": {"kubetune.io/pod-metadata": json.dumps(pods)}},
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": "builtin://kubectl-commands"},
            "resources": {"gpusPerNode": 0},
            "storage": {"claimName": "shared"},
            "serving": {"enabled": False},
        },
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleet_nodes() -> list[dict[str, Any]]:
    """Copies of hack/nodes.yaml's CPU node with room for the burst's pods."""
    [cpu] = [n for n in controlplane.fake_nodes(real_node=False)
             if not n["metadata"]["labels"].get("nvidia.com/gpu.present")]  # fmt: skip
    nodes = []
    for index in range(FLEET_NODES):
        node = copy.deepcopy(cpu)
        name = f"kwok-fleet-{index}"
        node["metadata"]["name"] = name
        node["metadata"]["labels"]["kubernetes.io/hostname"] = name
        for amounts in (node["status"]["allocatable"], node["status"]["capacity"]):
            amounts["pods"] = PODS_PER_NODE
        nodes.append(node)
    return nodes


def established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def prepare(cluster: controlplane.Cluster, workdir: Path) -> Path:
    """CRD, namespace, a bound shared claim, the fleet's nodes and the operator's
    ServiceAccount; returns the operator's kubeconfig (a token, as the chart deploys it)."""
    crd = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "crd"], capture_output=True, text=True, check=True
    ).stdout
    cluster.kubectl("apply", "--server-side", "-f", "-", input=crd)
    # Polled rather than `kubectl wait --for=condition=Established`: that fails at once when
    # the CRD has no status.conditions yet (it did, on the floor's fresh control plane).
    cluster.wait_for("crd", "finetunejobs.kubetune.io", established, what="the CRD")
    cluster.kubectl("create", "-f", "-", input="\n---\n".join(map(json.dumps, fleet_nodes())))
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=NAMESPACE)
    # kwok has no provisioner: a PV pre-bound to the claim, as the e2e tests make it.
    pv = f"pv-{NAMESPACE}-shared"
    cluster.apply(
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"],
                  "hostPath": {"path": f"/tmp/kubetune-bench/{pv}"}, "storageClassName": "",
                  "claimRef": {"namespace": NAMESPACE, "name": "shared"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "shared", "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "10Gi"}}}},
    )  # fmt: skip
    cluster.kubectl("create", "serviceaccount", "kubetune-operator", "-n", NAMESPACE)
    cluster.kubectl(
        "create", "clusterrolebinding", "kubetune-operator-bench", "--clusterrole=cluster-admin",
        f"--serviceaccount={NAMESPACE}:kubetune-operator",
    )  # fmt: skip
    return cluster.token_kubeconfig("kubetune-operator", NAMESPACE, workdir / "op.kubeconfig")


class Controller:
    """`kubetune operator` (or the floor) in a subprocess, every request it sends counted."""

    def __init__(self, cluster: controlplane.Cluster, workdir: Path, name: str,
                 arguments: list[str]) -> None:  # fmt: skip
        self.counts = workdir / f"{name}-counts.json"
        self.log_path = workdir / f"{name}.log"
        self.metrics_port = free_port()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, burst.__file__, "--counting-operator", str(self.counts), "--",
             *[a.replace("{port}", str(self.metrics_port)) for a in arguments]],
            stdout=log, stderr=subprocess.STDOUT, env={**cluster.env, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        log.close()

    def requests(self) -> Counter[str]:
        return burst.read_counts(self.counts)

    def memory_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def scrape(self) -> str | None:
        """/metrics; None before the Lease is held (a standby serves no port)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
                return str(r.read().decode())
        except OSError:
            return None

    def reconciles(self) -> float | None:
        """kubetune_reconciles_total; None before the Lease is held."""
        text = self.scrape()
        if text is None:
            return None
        for line in text.splitlines():
            if line.startswith("kubetune_reconciles_total "):
                return float(line.split()[1])
        return None

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def operator_arguments(kubeconfig: Path) -> list[str]:
    return ["--kubeconfig", str(kubeconfig), "--lease-namespace", NAMESPACE,
            "--progress-port", "{port}", "--liveness-port", "0", "--resync-seconds", "10",
            "--allow-pod-metadata"]  # fmt: skip


def apiserver_requests(cluster: controlplane.Cluster) -> Counter[str]:
    """`apiserver_request_total` summed by verb and resource (every client's requests)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                labels = sample.labels
                totals[f"{labels.get('verb')} {labels.get('resource')}"] += int(sample.value)
    return totals


def writes(counts: Counter[str]) -> Counter[str]:
    """The write requests in an operator's counts, the leader Lease's left out."""
    return Counter({k: v for k, v in counts.items()
                    if k.split(" ")[0] in WRITES and "leases" not in k})  # fmt: skip


def quiet(controller: Controller, seconds: float, limit: float) -> Counter[str]:
    """Wait until `controller` sent nothing but Lease requests for `seconds` (at most
    `limit` s); its counts then."""
    settled = controller.requests()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = controller.requests()
        if not [k for k in now - settled if "leases" not in k]:
            return now
        settled = now
    return settled


class Watches:
    """Training Jobs' first sight and FineTuneJobs' completion, from watches (not lists: the
    script should not load the API server it measures)."""

    def __init__(self) -> None:
        from kubernetes import client

        self.api = client.ApiClient()
        self.job_seen: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self.phases: dict[str, str] = {}
        self.stop = threading.Event()

    def start(self, follow_finetunejobs: bool) -> None:
        targets = [self._jobs] + ([self._finetunejobs] if follow_finetunejobs else [])
        for target in targets:
            threading.Thread(target=self._until_stopped(target), daemon=True).start()
        time.sleep(1)

    def _until_stopped(self, target: Any) -> Any:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    target()
                except Exception:
                    if self.stop.is_set():  # the cluster going away ends the watches
                        return
                    time.sleep(1)  # a watch the API server closed: open it again

        return run

    def _jobs(self) -> None:
        from kubernetes import client, watch

        batch = client.BatchV1Api(self.api)
        stream = watch.Watch()
        for event in stream.stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=3600):
            labels = event["object"].metadata.labels or {}
            if event["type"] == "ADDED" and labels.get("app.kubernetes.io/component") == "trainer":
                self.job_seen.setdefault(labels.get("kubetune.io/job", ""), time.monotonic())
            if self.stop.is_set():
                stream.stop()

    def _finetunejobs(self) -> None:
        from kubernetes import client, watch

        custom = client.CustomObjectsApi(self.api)
        stream = watch.Watch()
        for event in stream.stream(
            custom.list_namespaced_custom_object, "kubetune.io", "v1alpha1", NAMESPACE,
            "finetunejobs", timeout_seconds=3600,
        ):  # fmt: skip
            obj = event["object"]
            phase = (obj.get("status") or {}).get("phase")
            if event["type"] != "DELETED" and phase in DONE_PHASES:
                name = obj["metadata"]["name"]
                self.phases[name] = phase
                self.done_at.setdefault(name, time.monotonic())
            if self.stop.is_set():
                stream.stop()


def create_all(jobs: int) -> tuple[dict[str, float], float, float]:
    """(create time of each job, when the burst started, seconds to send it)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(client.ApiClient())
    created: dict[str, float] = {}

    def create(index: int) -> None:
        name = f"fleet-{index:04d}"
        created[name] = time.monotonic()
        custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", finetunejob(name)
        )

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, range(jobs)))
    return created, start, time.monotonic() - start


def latencies_ms(created: dict[str, float], seen: dict[str, float]) -> list[float]:
    return [(seen[n] - created[n]) * 1000 for n in created if n in seen]


def run_floor(cluster: controlplane.Cluster, jobs: int, workdir: Path) -> dict[str, Any]:
    from kubernetes import config

    kubeconfig = prepare(cluster, workdir)
    arguments = ["--floor", str(kubeconfig), "--allow-pod-metadata"]
    floor = Controller(cluster, workdir, "floor", arguments)
    try:
        controlplane.wait_for(lambda: "floor controller watching" in floor.log_path.read_text(),
                              timeout=60, what="the floor controller to start")  # fmt: skip
        config.load_kube_config(str(cluster.kubeconfig))
        watches = Watches()
        watches.start(follow_finetunejobs=False)
        created, start, _ = create_all(jobs)
        controlplane.wait_for(lambda: len(watches.job_seen) >= jobs, timeout=900,
                              what="the floor's Jobs", interval=0.2)  # fmt: skip
        watches.stop.set()
        latency = latencies_ms(created, watches.job_seen)
        return {"p50_ms": burst.percentile(latency, 0.5), "p99_ms": burst.percentile(latency, 0.99),
                "all_jobs_s": max(watches.job_seen.values()) - start,
                "rss_mib": floor.memory_mib()[0]}  # fmt: skip
    except Exception:
        print("floor log (last lines):", floor.log_tail(), sep="\n", file=sys.stderr)
        raise
    finally:
        floor.stop()


def run_kubetune(
    cluster: controlplane.Cluster, jobs: int, rest_seconds: float, workdir: Path
) -> dict[str, Any]:
    from kubernetes import config

    kubeconfig = prepare(cluster, workdir)
    leader = Controller(cluster, workdir, "leader", operator_arguments(kubeconfig))
    standby: Controller | None = None
    try:
        controlplane.wait_for(lambda: leader.reconciles() is not None, timeout=120,
                              what="the operator to hold the Lease")  # fmt: skip
        time.sleep(2)  # kopf opens its watches right after logging in
        config.load_kube_config(str(cluster.kubeconfig))
        watches = Watches()
        watches.start(follow_finetunejobs=True)
        api_before = apiserver_requests(cluster)
        ops_before = leader.requests()
        created, start, sent_in = create_all(jobs)
        controlplane.wait_for(lambda: len(watches.done_at) >= jobs, timeout=3600,
                              what="every FineTuneJob finished", interval=0.5)  # fmt: skip
        all_done_s = max(watches.done_at.values()) - start
        print(f"every job finished after {all_done_s:.1f} s", flush=True)
        settled = quiet(leader, 3.0, 120.0)
        api_done = apiserver_requests(cluster)
        to_completion = settled - ops_before
        api_to_completion = api_done - api_before
        rss, peak = leader.memory_mib()
        scrape_started = time.monotonic()
        exposition = leader.scrape() or ""
        scrape_ms = (time.monotonic() - scrape_started) * 1000
        job_series = sum(line.startswith("kubetune_job_") for line in exposition.splitlines())

        # At rest: nothing changes, so nothing should be written (resync passes included).
        rest_before = leader.requests()
        api_rest_before = apiserver_requests(cluster)
        time.sleep(rest_seconds)
        at_rest = leader.requests() - rest_before
        api_at_rest = apiserver_requests(cluster) - api_rest_before

        # Takeover: a standby waits on the Lease; the leader stops as in a rolling update.
        standby = Controller(cluster, workdir, "standby", operator_arguments(kubeconfig))
        controlplane.wait_for(lambda: "leases" in json.dumps(dict(standby.requests())),
                              timeout=120, what="the standby to poll the Lease")  # fmt: skip
        standby_before = standby.requests()
        stopped_at = time.monotonic()
        leader.stop()
        stopped_s = time.monotonic() - stopped_at
        # The standby serves /metrics once it holds the Lease.
        controlplane.wait_for(lambda: standby.scrape() is not None, timeout=600,
                              what="the standby to take the Lease", interval=0.1)  # fmt: skip
        acquired_s = time.monotonic() - stopped_at
        controlplane.wait_for(lambda: (standby.reconciles() or 0) >= jobs, timeout=600,
                              what="the new leader to reconcile every job",
                              interval=0.2)  # fmt: skip
        takeover_s = time.monotonic() - stopped_at
        print(f"the new leader reconciled every job after {takeover_s:.1f} s", flush=True)
        after_takeover = quiet(standby, 3.0, 120.0)
        takeover_settled_s = time.monotonic() - stopped_at
        takeover = after_takeover - standby_before
        new_rss, new_peak = standby.memory_mib()
        watches.stop.set()

        latency = latencies_ms(created, watches.job_seen)
        phases = Counter(watches.phases.values())
        return {
            "jobs": jobs, "sent_in_s": sent_in, "all_done_s": all_done_s,
            "phases": dict(phases),
            "p50_ms": burst.percentile(latency, 0.5), "p99_ms": burst.percentile(latency, 0.99),
            "max_ms": max(latency),
            "ops_per_job": sum(to_completion.values()) / jobs,
            "ops_breakdown": dict(to_completion.most_common(12)),
            "api_per_job": sum(api_to_completion.values()) / jobs,
            "api_breakdown": dict(api_to_completion.most_common(12)),
            "rss_mib": rss, "peak_mib": peak, "scrape_ms": scrape_ms, "job_series": job_series,
            "rest_s": rest_seconds, "rest_writes": dict(writes(at_rest)),
            "rest_requests": dict(at_rest.most_common()),
            "api_rest_writes": sum(v for k, v in api_at_rest.items()
                                   if k.split(" ")[0] in WRITES),
            "takeover_s": takeover_s, "takeover_settled_s": takeover_settled_s,
            "old_leader_exit_s": stopped_s, "lease_taken_s": acquired_s,
            "takeover_writes": dict(writes(takeover)),
            "takeover_requests": sum(takeover.values()),
            "new_rss_mib": new_rss, "new_peak_mib": new_peak,
        }  # fmt: skip
    except Exception:
        print("operator log (last lines):", leader.log_tail(), sep="\n", file=sys.stderr)
        if standby is not None:
            print("standby log (last lines):", standby.log_tail(), sep="\n", file=sys.stderr)
        raise
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()


def report(result: dict[str, Any], floor: dict[str, Any] | None) -> str:
    goal = lambda ok: "meets the goal" if ok else "MISSES the goal"  # noqa: E731
    jobs = result["jobs"]
    rest_writes = sum(result["rest_writes"].values())
    takeover_writes = sum(result["takeover_writes"].values())
    lines = [
        f"FineTuneJobs: {jobs} (16 client threads, {result['sent_in_s']:.1f} s to send them), "
        f"every one finished after {result['all_done_s']:.1f} s: {result['phases']}",
        f"create-to-training-Job: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
        f"max {result['max_ms']:.0f} ms",
        f"operator requests per job to completion: {result['ops_per_job']:.1f} "
        f"{result['ops_breakdown']}",
        f"API server requests per job to completion (apiserver_request_total, all clients): "
        f"{result['api_per_job']:.1f} {result['api_breakdown']}",
        f"operator memory once settled: {result['rss_mib']:.0f} MiB resident, peak "
        f"{result['peak_mib']:.0f} MiB ({goal(result['peak_mib'] < 400)} of 400 MiB); one "
        f"/metrics scrape {result['scrape_ms']:.0f} ms, {result['job_series']} kubetune_job_* "
        f"series",
        f"at rest for {result['rest_s']:.0f} s: {rest_writes} operator writes "
        f"({rest_writes / jobs:.3f} per job; {goal(rest_writes == 0)} of none) "
        f"{result['rest_writes'] or ''}; all its requests {result['rest_requests']}; "
        f"API server writes from every client: {result['api_rest_writes']}",
        f"takeover (leader stopped with SIGTERM, standby polling): every job reconciled by the "
        f"new leader after {result['takeover_s']:.1f} s ({goal(result['takeover_s'] < 60)} of "
        f"60 s; the old leader exited after {result['old_leader_exit_s']:.1f} s, the Lease was "
        f"taken after {result['lease_taken_s']:.1f} s), quiet after "
        f"{result['takeover_settled_s']:.1f} s; {takeover_writes} writes "
        f"({goal(takeover_writes == 0)} of none) {result['takeover_writes'] or ''}, "
        f"{result['takeover_requests']} requests; new leader {result['new_rss_mib']:.0f} MiB "
        f"resident, peak {result['new_peak_mib']:.0f} MiB",
    ]
    if floor is not None:
        ratio = result["p99_ms"] / floor["p99_ms"]
        lines.append(
            f"floor controller, same burst on a fresh control plane: p50 {floor['p50_ms']:.0f} "
            f"ms, p99 {floor['p99_ms']:.0f} ms, all Jobs after {floor['all_jobs_s']:.1f} s, "
            f"{floor['rss_mib']:.0f} MiB; KubeTune / floor: p50 "
            f"{result['p50_ms'] / floor['p50_ms']:.2f}x, p99 {ratio:.2f}x "
            f"({goal(ratio <= 1.5)} of 1.5x)"
        )
    return "\n".join(lines)


def record(text: str) -> None:
    entry = (
        f"\n### bench/fleet.py, {time.strftime('%Y-%m-%d')}\n\nMachine: {burst.machine()}; "
        f"control plane: hack/cluster.py (etcd, kube-apiserver, KCM, scheduler, kwok on "
        f"loopback, same machine).\n\n```\n{text}\n```\n"
    )
    # At the end of the Operator section, after operator_burst.py's entries.
    head, marker, tail = RESULTS.read_text().partition("## Operator\n")
    body, sep, rest = tail.partition("\n## ")
    after = sep + rest if sep else ""
    RESULTS.write_text(head + marker + body.rstrip("\n") + "\n" + entry + after)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--counting-operator":
        return burst.run_counting_operator(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rest-seconds", type=float, default=30.0)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor controller run")
    args = parser.parse_args()
    reason = controlplane.unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    # A fresh control plane for each run: the second must not inherit the first's objects.
    # KubeTune first, each result printed when it is known: a run cut short still says what
    # it measured.
    with tempfile.TemporaryDirectory(prefix="kubetune-fleet-") as tmp, controlplane.running(
        Path(tmp) / "cluster"
    ) as cluster:
        result = run_kubetune(cluster, args.jobs, args.rest_seconds, Path(tmp))
    print("kubetune:", json.dumps(result), flush=True)
    floor = None
    if not args.no_floor:
        with tempfile.TemporaryDirectory(prefix="kubetune-fleet-") as tmp, controlplane.running(
            Path(tmp) / "cluster"
        ) as cluster:
            floor = run_floor(cluster, args.jobs, Path(tmp))
        print("floor:", json.dumps(floor), flush=True)
    text = report(result, floor)
    print(text)
    if args.record:
        record(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
