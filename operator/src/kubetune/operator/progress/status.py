"""`status.progress` from a trainer's report: the merge patch the sink sends. Pure."""

from __future__ import annotations

from typing import Any

from kubetune.api.dataplane import ProgressReport
from kubetune.api.status import ProgressStatus
from kubetune.reconcile.status import decimal


def progress_status(report: ProgressReport, now: str) -> dict[str, Any]:
    """`status.progress` from a trainer's report: decimals as strings, a percentage."""
    percent = None
    if report.total_steps:
        percent = max(0, min(100, report.step * 100 // report.total_steps))
    progress = {
        "step": report.step,
        "totalSteps": report.total_steps,
        "epoch": decimal(report.epoch),
        "percent": percent,
        "trainLoss": decimal(report.train_loss),
        "evalLoss": decimal(report.eval_loss),
        "tokensPerSecond": decimal(report.tokens_per_second),
        "etaSeconds": None if report.eta_seconds is None else int(report.eta_seconds),
        "updateTime": now,
    }
    return {k: v for k, v in progress.items() if v is not None}


PROGRESS_KEYS = tuple(field.alias or name for name, field in ProgressStatus.model_fields.items())


def progress_patch(report: ProgressReport, now: str, generation: int | None) -> dict[str, Any]:
    """The `status` merge patch of a report: the whole progress of training `generation`.
    A key the report lacks is set to null, since a merge patch would otherwise leave it from
    an earlier report, or an earlier generation. Pure."""
    progress = {**progress_status(report, now), "generation": generation}
    return {"progress": {key: progress.get(key) for key in PROGRESS_KEYS}}
