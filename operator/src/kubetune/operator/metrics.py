"""Prometheus metrics of the operator, served as text at `/metrics` on the progress port.

One `OperatorMetrics` per operator, with a `CollectorRegistry` of its own (not the global
one), so tests and several operators in one process never share counters. Counts the
operator already keeps (the KubeClient's requests, the progress sink's patches, the
FineTuneJobs in kopf's index) are read at scrape time rather than copied on every event.

Each FineTuneJob's training progress is exported the same way, from `status.progress` in
kopf's index (which the progress sink patches from the trainers' reports, at most
`--progress-min-interval` seconds behind them): `kubetune_job_*` gauges labelled
`{namespace, job, generation}`, and `kubetune_job_phase{namespace, job, phase}` = 1 for the
job's current phase. A deleted job leaves the index, so its series leave the next scrape;
`status.progress` holds only the generation training now, so a new generation's series
replace the previous one's. Only the Lease holder serves /metrics (a standby waits for the
Lease before it starts), so no series is exported twice.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from pydantic import ValidationError

from kubetune.api.status import Phase, ProgressStatus

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


JOB_LABELS = ["namespace", "job", "generation"]
JobKey = tuple[str, str, str]
"""(namespace, job, generation): one series of each `kubetune_job_*` gauge."""


@dataclass(frozen=True)
class JobProgress:
    """One FineTuneJob's training progress as numbers, read from its `status.progress`."""

    namespace: str
    job: str
    generation: str
    """The training generation the progress is of ("" when the status names none)."""
    step: int
    total_steps: int | None
    train_loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    eta_seconds: int | None
    reported_at: float | None
    """Unix time of the report `status.progress` holds (its `updateTime`)."""


def _number(text: str | None) -> float | None:
    """A status decimal string as a float; None when absent or not a number (hand-edited)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _unix_time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def job_progress(body: Mapping[str, Any]) -> JobProgress | None:
    """The progress of one FineTuneJob body, or None when it has none yet (or it does not
    parse: a hand-edited status is not worth a scrape error). Pure."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    raw = status.get("progress")
    if not isinstance(raw, Mapping):
        return None
    try:
        progress = ProgressStatus.model_validate(raw)
    except ValidationError:
        return None
    return JobProgress(
        namespace=str(meta.get("namespace") or ""),
        job=str(meta.get("name") or ""),
        generation="" if progress.generation is None else str(progress.generation),
        step=progress.step,
        total_steps=progress.total_steps,
        train_loss=_number(progress.train_loss),
        eval_loss=_number(progress.eval_loss),
        tokens_per_second=_number(progress.tokens_per_second),
        eta_seconds=progress.eta_seconds,
        reported_at=_unix_time(progress.update_time),
    )


class StepClock:
    """When each job's current step was first seen: `kubetune_job_last_step_timestamp_seconds`.

    A report's `updateTime` is when it was reported; a report that repeats the step it
    reported before (the trainer always sends its final step, once more) must not look like
    progress to the "stalled" alert, so the time of the first report of a step is kept, per
    job and generation. Jobs gone from a scrape are forgotten, so it holds one entry per job
    the operator sees."""

    def __init__(self) -> None:
        self._seen: dict[JobKey, tuple[int, float]] = {}

    def last_step_times(self, progresses: Iterable[JobProgress]) -> dict[JobKey, float]:
        seen: dict[JobKey, tuple[int, float]] = {}
        for progress in progresses:
            if progress.reported_at is None:
                continue
            key = (progress.namespace, progress.job, progress.generation)
            step, first_seen = self._seen.get(key, (progress.step, progress.reported_at))
            if step != progress.step:
                first_seen = progress.reported_at
            seen[key] = (progress.step, first_seen)
        self._seen = seen
        return {key: when for key, (_, when) in seen.items()}


def job_families(
    bodies: Iterable[Mapping[str, Any]], clock: StepClock
) -> list[GaugeMetricFamily]:
    """The `kubetune_job_*` gauges of every FineTuneJob in `bodies`."""
    bodies = list(bodies)
    progresses = [p for p in (job_progress(body) for body in bodies) if p is not None]
    last_steps = clock.last_step_times(progresses)
    gauges: dict[str, tuple[str, Callable[[JobProgress], float | None]]] = {
        "kubetune_job_step": ("Optimizer steps the job's training generation has done.",
                              lambda p: p.step),
        "kubetune_job_total_steps": ("Optimizer steps the training generation will take.",
                                     lambda p: p.total_steps),
        "kubetune_job_train_loss": ("Latest training loss a trainer reported.",
                                    lambda p: p.train_loss),
        "kubetune_job_eval_loss": ("Latest validation loss a trainer reported.",
                                   lambda p: p.eval_loss),
        "kubetune_job_tokens_per_second": ("Training throughput, all ranks together.",
                                           lambda p: p.tokens_per_second),
        "kubetune_job_eta_seconds": ("Estimated seconds until training finishes.",
                                     lambda p: p.eta_seconds),
        "kubetune_job_last_step_timestamp_seconds": (
            "Unix time the current step was first reported (time() minus it: a stall).",
            lambda p: last_steps.get((p.namespace, p.job, p.generation)),
        ),
    }  # fmt: skip
    families = []
    for name, (documentation, value_of) in gauges.items():
        family = GaugeMetricFamily(name, documentation, labels=JOB_LABELS)
        for progress in progresses:
            value = value_of(progress)
            if value is not None:
                family.add_metric([progress.namespace, progress.job, progress.generation], value)
        families.append(family)
    phases = GaugeMetricFamily(
        "kubetune_job_phase",
        "1 for the FineTuneJob's current status.phase (other phases have no series).",
        labels=["namespace", "job", "phase"],
    )
    for body in bodies:
        meta = body.get("metadata") or {}
        phase = str((body.get("status") or {}).get("phase") or NO_PHASE)
        phases.add_metric([str(meta.get("namespace") or ""), str(meta.get("name") or ""), phase], 1)
    families.append(phases)
    return families


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
        bodies = list(self.owner.finetunejobs())
        for phase, count in sorted(phase_counts(bodies).items()):
            jobs.add_metric([phase], count)
        yield jobs
        yield from job_families(bodies, self.owner.step_clock)


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
        self.step_clock = StepClock()
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

