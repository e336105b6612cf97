#!/usr/bin/env python3
"""Operator benchmark: 200 FineTuneJobs created at once against the real control plane.

Prints create-to-training-Job latency (p50, p99), the time until every FineTuneJob is
reconciled (Validated=True and its training Job reported in status), and the API requests the
operator sent per FineTuneJob during the burst and while idle afterwards (watches count once,
when opened). Goals (issue 5): p50 <= 250 ms, p99 <= 1 s, no request loop while idle.

The operator is the real `kubetune operator` in a subprocess; a wrapper counts every HTTP
request its aiohttp sessions send (kopf's watches and patches as well as KubeTune's own
applies), so the numbers are the operator's alone, not the apiserver's other clients'.

The jobs carry a Kueue queue label, so their training Jobs are created suspended (as Kueue
would hold them): the benchmark measures the operator, not kwok and the scheduler running
200 fake pods on three fake nodes.

The same burst also runs, on a fresh control plane, against a floor controller (one watch,
the same training Job applied at once, nothing else): what any controller would get from
this machine and API server. The ratio to it is printed.

    python bench/operator_burst.py [--jobs 200] [--idle-seconds 30] [--record] [--no-floor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

import cluster as controlplane  # noqa: E402  (hack/ is not a package)

NAMESPACE = "bench"
RESULTS = ROOT / "bench" / "RESULTS.md"


# --------------------------------------------------------------------------- counting operator


def run_counting_operator(counts_file: str, operator_args: list[str]) -> int:
    """Run `kubetune operator` with every aiohttp request counted into `counts_file`."""
    import aiohttp

    counts: Counter[str] = Counter()
    original = aiohttp.ClientSession._request

    async def counted(self: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
        params = kwargs.get("params") or {}
        watch = "watch" in str(url) or str(params.get("watch", "")).lower() == "true"
        parts = str(url).split("?")[0].rstrip("/").split("/")
        # .../<resource>/<name>, .../<name>/status, or a POST to the collection itself.
        collection = method.upper() == "POST" or watch or parts[-1] in {"status", "eviction"}
        resource = parts[-1] if collection else parts[-2]
        counts[f"{'WATCH' if watch else method.upper()} {resource}"] += 1
        return await original(self, method, url, **kwargs)

    aiohttp.ClientSession._request = counted  # type: ignore[method-assign,assignment]

    def dump() -> None:
        while True:
            Path(counts_file + ".tmp").write_text(json.dumps(dict(counts)))
            os.replace(counts_file + ".tmp", counts_file)
            time.sleep(0.2)

    threading.Thread(target=dump, daemon=True).start()
    if operator_args[:1] == ["--floor"]:
        pod_metadata = "--allow-pod-metadata" in operator_args  # bench/fleet.py's pods end
        return asyncio.run(floor_controller(operator_args[1], pod_metadata))
    from kubetune.cli import main

    return main(["operator", *operator_args])


async def floor_controller(kubeconfig: str, allow_pod_metadata: bool = False) -> int:
    """The floor: the least a controller can do on this machine. One watch on FineTuneJobs
    and, for each new one, the same training Job KubeTune builds, server-side applied at
    once: no kopf, no planner, no ConfigMap/Service/status/Event, no retries. What it
    measures is the API server's and the machine's share of the latency. With
    `allow_pod_metadata` its pods end as the FineTuneJob's `kubetune.io/pod-metadata` tells
    kwok, as the operator's do with the same flag."""
    import aiohttp

    from kubetune.api import FineTuneJobSpec
    from kubetune.builders.config import OperatorConfig
    from kubetune.builders.meta import Owner, training_hash
    from kubetune.builders.training import training_job
    from kubetune.operator.client import KubeClient

    client = KubeClient.connect(kubeconfig)
    config = OperatorConfig(allow_pod_metadata=allow_pod_metadata)
    tasks: set[asyncio.Task[Any]] = set()
    url = f"{client.server}/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs"
    connector = aiohttp.TCPConnector(ssl=client._ssl)
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:  # until RBAC for the fresh ServiceAccount is in effect
            response = await session.get(
                url,
                params={"watch": "true"},
                headers=client._headers(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            if response.status == 200:
                break
            response.release()
            await asyncio.sleep(0.5)
        print("floor controller watching", flush=True)
        async for line in response.content:
            event = json.loads(line)
            if event.get("type") != "ADDED":
                continue
            body = event["object"]
            spec = FineTuneJobSpec.model_validate(body["spec"])
            job = training_job(
                Owner.from_body(body), 1, spec, config, training_hash(spec)
            )
            task = asyncio.create_task(client.apply(job, metadata_only=True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await client.close()
    return 0


def read_counts(path: Path) -> Counter[str]:
    try:
        return Counter(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Counter()


# --------------------------------------------------------------------------- the run


def finetunejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"kueue.x-k8s.io/queue-name": "bench"},
        },
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": "builtin://kubectl-commands"},
            "resources": {"gpusPerNode": 1},
            "storage": {"claimName": "shared"},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.0f} GiB RAM, {platform.system()}"


def reconciled(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    validated = conditions.get("Validated", {})
    trained = conditions.get("Trained", {})
    return (
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and validated.get("status") == "True"
        and trained.get("reason") == "Queued"  # the Job exists and the operator has seen it
    )


def benchmark(
    cluster: controlplane.Cluster, jobs: int, idle_seconds: float, workdir: Path, floor: bool
) -> dict[str, Any]:
    """One burst against `kubetune operator`, or against the floor controller."""
    from kubernetes import client, config, watch

    crd = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "crd"], capture_output=True, text=True, check=True
    ).stdout
    cluster.kubectl("apply", "--server-side", "-f", "-", input=crd)
    controlplane.wait_for(
        lambda: (
            "Established"
            in cluster.kubectl(
                "get",
                "crd",
                "finetunejobs.kubetune.io",
                "-o",
                "jsonpath={.status.conditions[*].type}",
            ).stdout
        ),
        timeout=30,
        what="the CRD to be established",
    )
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.wait_for("serviceaccount", "default", lambda _: True, namespace=NAMESPACE)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "shared", "namespace": NAMESPACE},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )

    # The operator authenticates as a Deployment of it would: with a ServiceAccount token
    # (the admin kubeconfig's client certificate costs the API server a chain verification
    # on every request). cluster-admin stands in for the chart's ClusterRole.
    cluster.kubectl("create", "serviceaccount", "kubetune-operator", "-n", NAMESPACE)
    cluster.kubectl(
        "create", "clusterrolebinding", "kubetune-operator-bench", "--clusterrole=cluster-admin",
        f"--serviceaccount={NAMESPACE}:kubetune-operator",
    )  # fmt: skip
    operator_kubeconfig = cluster.token_kubeconfig(
        "kubetune-operator", NAMESPACE, workdir / "operator.kubeconfig"
    )
    counts_file = workdir / "counts.json"
    log = (workdir / "operator.log").open("wb")
    arguments = (
        ["--floor", str(operator_kubeconfig)] if floor else [
            "--kubeconfig", str(operator_kubeconfig), "--lease-namespace", NAMESPACE,
            "--progress-port", "0", "--liveness-port", "0", "--resync-seconds", "10",
        ]
    )  # fmt: skip
    operator = subprocess.Popen(
        [sys.executable, __file__, "--counting-operator", str(counts_file), "--", *arguments],
        stdout=log, stderr=subprocess.STDOUT, env=cluster.env,
    )  # fmt: skip
    started = "floor controller watching" if floor else "Initial authentication has finished"
    try:
        controlplane.wait_for(
            lambda: started in (workdir / "operator.log").read_text(),
            timeout=60, what="the operator to start",
        )  # fmt: skip
        time.sleep(2)  # kopf opens its watches right after logging in; let them settle
        config.load_kube_config(str(cluster.kubeconfig))
        api = client.ApiClient()
        custom = client.CustomObjectsApi(api)
        batch = client.BatchV1Api(api)

        job_seen: dict[str, float] = {}
        stop = threading.Event()

        def watch_jobs() -> None:
            stream = watch.Watch()
            for event in stream.stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=600):
                if event["type"] == "ADDED":
                    owner = event["object"].metadata.labels.get("kubetune.io/job")
                    job_seen.setdefault(owner, time.monotonic())
                if stop.is_set():
                    stream.stop()

        def until_stopped(target: Any) -> Any:
            def run() -> None:
                try:
                    target()
                except Exception:
                    if not stop.is_set():  # the cluster going away ends the watches
                        raise

            return run

        done_at: dict[str, float] = {}

        def watch_finetunejobs() -> None:
            # A watch, not a list every few hundred milliseconds: the benchmark should not
            # load the API server it measures with 200-object lists.
            stream = watch.Watch()
            for event in stream.stream(
                custom.list_namespaced_custom_object, "kubetune.io", "v1alpha1", NAMESPACE,
                "finetunejobs", timeout_seconds=600,
            ):  # fmt: skip
                obj = event["object"]
                if event["type"] != "DELETED" and reconciled(obj):
                    done_at.setdefault(obj["metadata"]["name"], time.monotonic())
                if stop.is_set():
                    stream.stop()

        for target in (watch_jobs, watch_finetunejobs):
            threading.Thread(target=until_stopped(target), daemon=True).start()
        time.sleep(1)
        before = read_counts(counts_file)
        created: dict[str, float] = {}

        def create(index: int) -> None:
            name = f"bench-{index:04d}"
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", finetunejob(name)
            )

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, range(jobs)))
        created_all = time.monotonic() - start

        # The floor writes no status: for it, "reconciled" is its Job existing.
        finished = job_seen if floor else done_at
        controlplane.wait_for(lambda: len(finished) >= jobs, timeout=120,
                              what="every FineTuneJob reconciled", interval=0.05)  # fmt: skip
        done = max(finished.values()) - start
        # The burst's requests include what the operator sends after the last status (Events
        # wait for the critical lane to be idle): count until nothing but Lease renewals
        # came for two seconds.
        settled = read_counts(counts_file)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(2)
            now_counts = read_counts(counts_file)
            if not [k for k in now_counts - settled if "leases" not in k]:
                break
            settled = now_counts
        burst = settled - before

        # Idle: count over a window that spans several resync periods.
        idle_start = read_counts(counts_file)
        time.sleep(idle_seconds)
        idle = read_counts(counts_file) - idle_start
        stop.set()

        latencies = [(job_seen[n] - created[n]) * 1000 for n in created if n in job_seen]
        return {
            "jobs": jobs,
            "created_in_s": created_all,
            "jobs_seen": len(latencies),
            "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies),
            "mean_ms": statistics.mean(latencies),
            "all_reconciled_s": done,
            "burst_requests": sum(burst.values()),
            "burst_per_job": sum(burst.values()) / jobs,
            "burst_breakdown": dict(burst.most_common()),
            "idle_seconds": idle_seconds,
            "idle_requests": sum(idle.values()),
            "idle_per_job": sum(idle.values()) / jobs,
            "idle_breakdown": dict(idle.most_common()),
        }
    except Exception:
        log.flush()
        tail = (workdir / "operator.log").read_text().splitlines()[-40:]
        print("controller log (last lines):", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        log.close()


def report(result: dict[str, Any]) -> str:
    goal = lambda ok: "meets the goal" if ok else "MISSES the goal"  # noqa: E731
    lines = [
        f"FineTuneJobs created at once: {result['jobs']} (16 client threads, "
        f"{result['created_in_s']:.1f} s to send them all)",
        f"create-to-training-Job latency: p50 {result['p50_ms']:.0f} ms "
        f"({goal(result['p50_ms'] <= 250)} of 250 ms), p99 {result['p99_ms']:.0f} ms "
        f"({goal(result['p99_ms'] <= 1000)} of 1 s), max {result['max_ms']:.0f} ms",
        f"all reconciled after: {result['all_reconciled_s']:.1f} s",
        f"operator API requests per job during the burst: {result['burst_per_job']:.1f} "
        f"({result['burst_requests']} in all: {result['burst_breakdown']})",
        f"operator API requests while idle for {result['idle_seconds']:.0f} s: "
        f"{result['idle_requests']} ({result['idle_per_job']:.2f} per job) "
        f"{result['idle_breakdown'] or ''}",
    ]
    return "\n".join(lines)


def floor_report(floor: dict[str, Any], kubetune: dict[str, Any]) -> str:
    return (
        f"floor controller (one watch, the same Job applied at once, nothing else), same "
        f"burst: p50 {floor['p50_ms']:.0f} ms, p99 {floor['p99_ms']:.0f} ms, all Jobs after "
        f"{floor['all_reconciled_s']:.1f} s, {floor['burst_per_job']:.1f} requests per job\n"
        f"KubeTune / floor: p50 {kubetune['p50_ms'] / floor['p50_ms']:.2f}x, "
        f"p99 {kubetune['p99_ms'] / floor['p99_ms']:.2f}x"
    )


def record(text: str) -> None:
    stamp = time.strftime("%Y-%m-%d")
    entry = (
        f"\n### bench/operator_burst.py, {stamp}\n\nMachine: {machine()}; control plane: "
        f"hack/cluster.py (etcd, kube-apiserver, KCM, scheduler, kwok on loopback, same "
        f"machine).\n\n```\n{text}\n```\n"
    )
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if "## Operator" not in existing:
        existing = existing.rstrip("\n") + "\n\n## Operator\n"
    head, _, tail = existing.partition("## Operator\n")
    # Append inside the Operator section, before the next section if any.
    body, sep, rest = tail.partition("\n## ")
    RESULTS.write_text(
        head + "## Operator\n" + body.rstrip("\n") + "\n" + entry + (sep + rest if sep else "")
    )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--counting-operator":
        return run_counting_operator(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor controller run")
    args = parser.parse_args()
    reason = controlplane.unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    runs: dict[str, dict[str, Any]] = {}
    for name in ("kubetune",) if args.no_floor else ("floor", "kubetune"):
        # A fresh control plane for each run: the second must not inherit the first's objects.
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
            workdir = Path(tmp)
            with controlplane.running(workdir / "cluster") as cluster:
                floor = name == "floor"
                idle = 0.0 if floor else args.idle_seconds
                runs[name] = benchmark(cluster, args.jobs, idle, workdir, floor)
    text = report(runs["kubetune"])
    if "floor" in runs:
        text += "\n" + floor_report(runs["floor"], runs["kubetune"])
    print(text)
    if args.record:
        record(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
