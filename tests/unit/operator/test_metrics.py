"""`/metrics` on the progress port: Prometheus text from the progress server's aiohttp app."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import API_VERSION, KIND, FineTuneJobSpec
from kubetune.builders.meta import training_hash
from kubetune.operator.metrics import OperatorMetrics, index_bodies, phase_counts
from kubetune.operator.progress.server import ProgressServer
from kubetune.operator.progress.sink import ProgressSink

AUDIENCE = "kubetune.io/progress"
POD = "demo-g1-train-0-x"


class FakeClient:
    """The two reads the progress endpoint makes, and the request tally kube.py keeps."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter({"PATCH finetunejobs": 2, "GET pods": 1})

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        self.requests["POST tokenreviews"] += 1
        return {
            "status": {
                "authenticated": token == "good",
                "audiences": audiences,
                "user": {
                    "username": "system:serviceaccount:team:kubetune-trainer",
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [POD],
                        "authentication.kubernetes.io/pod-uid": ["uid-p"],
                    },
                },
            }
        }

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        # The owner chain the endpoint checks: pod -> training Job -> FineTuneJob (the
        # chain's refusals are tested in test_progress.py).
        spec = {"model": {"source": "builtin://smollm2-135m-instruct"},
                "dataset": {"source": "builtin://kubectl-commands"}}  # fmt: skip
        if kind == "FineTuneJob":
            return {"metadata": {"name": name, "namespace": namespace, "uid": "uid-f"},
                    "spec": spec}  # fmt: skip
        if kind == "Job":
            labels = {"app.kubernetes.io/component": "trainer", "kubetune.io/generation": "1"}
            digest = training_hash(FineTuneJobSpec.model_validate(spec))
            return {"metadata": {"name": name, "namespace": namespace, "uid": "uid-j",
                                 "labels": labels,
                                 "annotations": {"kubetune.io/training-hash": digest},
                                 "ownerReferences": [_controller(API_VERSION, KIND, "demo",
                                                                 "uid-f")]}}  # fmt: skip
        owner = _controller("batch/v1", "Job", "demo-g1-train", "uid-j")
        return {"metadata": {"name": name, "namespace": namespace, "uid": "uid-p",
                             "ownerReferences": [owner]}}  # fmt: skip

    find = get  # a list by name (Jobs, FineTuneJobs), the same answer here

    async def patch_status(self, *_: Any) -> None:
        return None


def _controller(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_phase_counts_list_every_phase() -> None:
    counts = phase_counts([{"status": {"phase": "Training"}}, {"status": {}}, {}])
    assert counts["Training"] == 1
    assert counts["Unknown"] == 2
    assert counts["Succeeded"] == 0


def test_index_bodies_reads_kopfs_index_and_is_empty_before_it() -> None:
    assert index_bodies({}) == []
    body = {"metadata": {"name": "demo"}}
    assert index_bodies({"indexes": {"finetunejobs": {("team", "demo"): [body]}}}) == [body]


def test_metrics_endpoint_serves_prometheus_text() -> None:
    client = FakeClient()
    sink = ProgressSink(client, 60.0, lambda: "2026-01-01T00:00:00Z")  # type: ignore[arg-type]
    jobs = [{"status": {"phase": "Training"}}, {"status": {"phase": "Succeeded"}}]
    metrics = OperatorMetrics(
        api_requests=lambda: client.requests,
        progress_patches=lambda: sink.patches,
        finetunejobs=lambda: jobs,
    )
    server = ProgressServer(client, AUDIENCE, sink, metrics)  # type: ignore[arg-type]
    metrics.reconciles.inc(3)
    metrics.reconcile_errors.inc()

    async def scenario() -> tuple[str, str, list[int]]:
        runner = web.AppRunner(server.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        url = f"{base}/v1/progress/team/demo"
        codes = []
        try:
            async with aiohttp.ClientSession() as session:
                for headers in ({}, {"Authorization": "Bearer bad"},
                                {"Authorization": "Bearer good"}):  # fmt: skip
                    async with session.post(url, json={"step": 1}, headers=headers) as response:
                        codes.append(response.status)
                # The accepted report's status patch (immediate: the job's first) lands first.
                await asyncio.gather(*list(sink._tasks.values()))
                async with session.get(f"{base}/metrics") as response:
                    assert response.status == 200
                    return response.headers["Content-Type"], await response.text(), codes
        finally:
            await runner.cleanup()

    content_type, text, codes = asyncio.run(scenario())
    assert codes == [401, 401, 202]
    assert content_type.startswith("text/plain")
    samples = _samples(text)
    assert samples[("kubetune_reconciles_total", ())] == 3
    assert samples[("kubetune_reconcile_errors_total", ())] == 1
    assert samples[("kubetune_api_requests_total",
                    (("method", "PATCH"), ("resource", "finetunejobs")))] == 2  # fmt: skip
    assert samples[("kubetune_api_requests_total",
                    (("method", "POST"), ("resource", "tokenreviews")))] == 2  # fmt: skip
    accepted = (("code", "202"), ("result", "accepted"))
    refused = (("code", "401"), ("result", "refused"))
    assert samples[("kubetune_progress_reports_total", accepted)] == 1
    assert samples[("kubetune_progress_reports_total", refused)] == 2
    assert samples[("kubetune_progress_status_patches_total", ())] == 1
    assert samples[("kubetune_finetunejobs", (("phase", "Training"),))] == 1
    assert samples[("kubetune_finetunejobs", (("phase", "Failed"),))] == 0


def test_each_server_has_its_own_registry() -> None:
    first, second = OperatorMetrics(), OperatorMetrics()
    first.reconciles.inc()
    assert b"kubetune_reconciles_total 1.0" in first.exposition()
    assert b"kubetune_reconciles_total 0.0" in second.exposition()


def _job(name: str, phase: str | None, progress: dict[str, Any] | None) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if progress is not None:
        status["progress"] = progress
    return {"metadata": {"namespace": "team", "name": name}, "status": status}


def _job_samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: value for key, value in _samples(metrics.exposition().decode()).items()
            if key[0].startswith("kubetune_job_")}  # fmt: skip


PROGRESS = {"generation": 2, "step": 30, "totalSteps": 120, "trainLoss": "1.25",
            "evalLoss": "1.5", "tokensPerSecond": "310.5", "etaSeconds": 90,
            "updateTime": "2026-01-01T00:00:10Z"}  # fmt: skip
T10 = 1767225610.0  # 2026-01-01T00:00:10Z


def test_job_gauges_carry_each_jobs_progress_and_phase() -> None:
    jobs = [_job("train", "Training", PROGRESS), _job("new", None, None)]
    metrics = OperatorMetrics(finetunejobs=lambda: jobs)
    labels = (("generation", "2"), ("job", "train"), ("namespace", "team"))
    assert _job_samples(metrics) == {
        ("kubetune_job_step", labels): 30,
        ("kubetune_job_total_steps", labels): 120,
        ("kubetune_job_train_loss", labels): 1.25,
        ("kubetune_job_eval_loss", labels): 1.5,
        ("kubetune_job_tokens_per_second", labels): 310.5,
        ("kubetune_job_eta_seconds", labels): 90,
        ("kubetune_job_last_step_timestamp_seconds", labels): T10,
        ("kubetune_job_phase", (("job", "train"), ("namespace", "team"), ("phase", "Training"))): 1,
        # No status yet: a phase series only (the same "Unknown" kubetune_finetunejobs counts).
        ("kubetune_job_phase", (("job", "new"), ("namespace", "team"), ("phase", "Unknown"))): 1,
    }


def test_a_value_the_report_lacks_has_no_series() -> None:
    progress = {"generation": 1, "step": 0, "updateTime": "2026-01-01T00:00:10Z"}
    metrics = OperatorMetrics(finetunejobs=lambda: [_job("early", "Training", progress)])
    names = {name for name, _ in _job_samples(metrics)}
    assert names == {"kubetune_job_step", "kubetune_job_last_step_timestamp_seconds",
                     "kubetune_job_phase"}  # fmt: skip


def test_a_deleted_jobs_series_go_and_a_new_generations_replace_the_old() -> None:
    jobs = [_job("a", "Training", PROGRESS), _job("b", "Training", PROGRESS)]
    metrics = OperatorMetrics(finetunejobs=lambda: jobs)
    assert {dict(labels)["job"] for _, labels in _job_samples(metrics)} == {"a", "b"}
    jobs[:] = [_job("a", "Training", {**PROGRESS, "generation": 3, "step": 1})]
    samples = _job_samples(metrics)
    assert {(dict(labels)["job"], dict(labels).get("generation")) for _, labels in samples} == {
        ("a", "3"), ("a", None)  # None: the phase series, which has no generation
    }


def test_the_last_step_time_is_when_the_step_was_first_reported() -> None:
    """A report repeating its step (the trainer's final one is always sent again) is no
    progress: the "stalled" alert must keep counting from the step's first report."""
    jobs = [_job("train", "Training", PROGRESS)]
    metrics = OperatorMetrics(finetunejobs=lambda: jobs)
    key = ("kubetune_job_last_step_timestamp_seconds",
           (("generation", "2"), ("job", "train"), ("namespace", "team")))  # fmt: skip
    assert _job_samples(metrics)[key] == T10
    jobs[:] = [_job("train", "Training", {**PROGRESS, "updateTime": "2026-01-01T00:05:10Z"})]
    assert _job_samples(metrics)[key] == T10
    jobs[:] = [_job("train", "Training",
                    {**PROGRESS, "step": 31, "updateTime": "2026-01-01T00:06:10Z"})]  # fmt: skip
    assert _job_samples(metrics)[key] == T10 + 360


def test_a_hand_edited_progress_that_does_not_parse_is_left_out() -> None:
    jobs = [_job("odd", "Training", {"step": "many", "trainLoss": "low"})]
    metrics = OperatorMetrics(finetunejobs=lambda: jobs)
    assert set(_job_samples(metrics)) == {
        ("kubetune_job_phase", (("job", "odd"), ("namespace", "team"), ("phase", "Training")))
    }
