"""Prometheus metrics of the operator, served as text at `/metrics` on the progress port.

One `OperatorMetrics` per operator, with a `CollectorRegistry` of its own (not the global
one), so tests and several operators in one process never share counters. Counts the
operator already keeps (the KubeClient's requests, the progress sink's patches, the
FineTuneJobs in kopf's index) are read at scrape time rather than copied on every event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from kubetune.api.status import Phase

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The classic text format every Prometheus version scrapes."""
NO_PHASE = "Unknown"


def phase_counts(bodies: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """FineTuneJobs by `status.phase`; every phase is listed, zero included. Pure."""
    counts = {phase.value: 0 for phase in Phase}
    for body in bodies:
        phase = str((body.get("status") or {}).get("phase") or NO_PHASE)
        counts[phase] = counts.get(phase, 0) + 1
    return counts


class _ScrapeTimeCollector(Collector):
    """Values the operator keeps anyway, read when Prometheus scrapes."""

    def __init__(self, owner: OperatorMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "kubetune_api_requests",
            "Requests the operator sent to the API server (kopf's watches not included).",
            labels=["method", "resource"],
        )
        for key, count in sorted(self.owner.api_requests().items()):
            method, _, resource = key.partition(" ")
            requests.add_metric([method, resource], count)
        yield requests
        patches = CounterMetricFamily(
            "kubetune_progress_status_patches",
            "Status patches made from trainer progress reports (rate-limited per job).",
        )
        patches.add_metric([], self.owner.progress_patches())
        yield patches
        jobs = GaugeMetricFamily(
            "kubetune_finetunejobs", "FineTuneJobs this operator sees, by phase.", labels=["phase"]
        )
        for phase, count in sorted(phase_counts(self.owner.finetunejobs()).items()):
            jobs.add_metric([phase], count)
        yield jobs


def gate_verdicts(bodies: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """(namespace, job, generation, passed) of each FineTuneJob whose status records the
    evaluation gate's verdict (`status.evaluation.passed`, for `status.evaluation.generation`);
    jobs not yet evaluated are left out. Pure."""
    verdicts = []
    for body in bodies:
        evaluation = (body.get("status") or {}).get("evaluation") or {}
        passed = evaluation.get("passed")
        if passed is None:
            continue
        meta = body.get("metadata") or {}
        verdicts.append((
            str(meta.get("namespace", "")), str(meta.get("name", "")),
            str(evaluation.get("generation", "")), bool(passed),
        ))  # fmt: skip
    return sorted(verdicts)


class _GateCollector(Collector):
    """The gate's verdict per job, read from status when Prometheus scrapes: the chart's
    alert on a refused model (charts/kubetune/rules/) reads it. A deleted job leaves the
    index, and so its series goes."""

    def __init__(self, finetunejobs: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.finetunejobs = finetunejobs

    def collect(self) -> Iterator[Metric]:
        gate = GaugeMetricFamily(
            "kubetune_job_gate_passed",
            "1 when the evaluation gate passed the job's newest evaluated generation, 0 when it "
            "refused it (and the model serving before stays).",
            labels=["namespace", "job", "generation"],
        )
        for namespace, job, generation, passed in gate_verdicts(self.finetunejobs()):
            gate.add_metric([namespace, job, generation], 1.0 if passed else 0.0)
        yield gate


class OperatorMetrics:
    """Counters the handlers and the progress server increment, plus scrape-time readings."""

    def __init__(
        self,
        api_requests: Callable[[], Mapping[str, int]] = dict,
        progress_patches: Callable[[], int] = lambda: 0,
        finetunejobs: Callable[[], Iterable[Mapping[str, Any]]] = list,
    ) -> None:
        self.api_requests = api_requests
        self.progress_patches = progress_patches
        self.finetunejobs = finetunejobs
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "kubetune_reconciles",
            "Reconciles of a FineTuneJob (events and the periodic resync).",
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors",
            "Reconciles that raised (retried later).",
            registry=self.registry,
        )
        self.progress_reports = Counter(
            "kubetune_progress_reports",
            "Progress reports from trainer pods, by result and HTTP status.",
            ["result", "code"],
            registry=self.registry,
        )
        self.progress_tokenreviews = Counter(
            "kubetune_progress_tokenreviews",
            "TokenReviews the progress endpoint sent (one per new token, within its budgets).",
            registry=self.registry,
        )
        self.registry.register(_ScrapeTimeCollector(self))
        self.registry.register(_GateCollector(lambda: self.finetunejobs()))

    def report(self, accepted: bool, code: int) -> None:
        result = "accepted" if accepted else "refused"
        self.progress_reports.labels(result=result, code=str(code)).inc()

    def tokenreview(self) -> None:
        self.progress_tokenreviews.inc()

    def exposition(self) -> bytes:
        """The Prometheus text format (0.0.4)."""
        return generate_latest(self.registry)


def index_bodies(shared: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The FineTuneJobs in kopf's `finetunejobs` index (kept in `memo.shared` by the
    handlers); empty before the first handler ran."""
    indexes = shared.get("indexes")
    if not indexes:
        return []
    return [body for bodies in list(indexes["finetunejobs"].values()) for body in list(bodies)]

