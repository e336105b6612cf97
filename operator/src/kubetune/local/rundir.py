"""The run directory of `kubetune run`: atomic JSON files and what they say is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.api import RunConfig
from kubetune.api.dataplane import (
    ExportReport,
    TrainingReport,
    resolve_precision,
    resolve_quantization,
    weights_label,
)
from kubetune.api.spec import Device, Precision


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves half a file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def read_report(run_dir: Path) -> TrainingReport:
    """The trainer's `report.json` (an empty, failed report when there is none yet)."""
    return TrainingReport.read(run_dir / "report.json") or TrainingReport()


def write_report(run_dir: Path, report: TrainingReport) -> None:
    write_json(run_dir / "report.json", report.model_dump(by_alias=True, mode="json"))


def training_done(run_dir: Path) -> bool:
    """The trainer writes `report.json` last, with status Succeeded once `merged/` is saved."""
    return read_report(run_dir).succeeded and (run_dir / "merged").is_dir()


def export_precision(config: RunConfig) -> str:
    """What the exporter will build: `Auto` on CPU, which the exporter decides by measuring
    candidates; else `weights_label` (the shared `Auto` rule, INT4's method when not RTN)."""
    serving = config.spec.serving
    if serving.precision is Precision.AUTO and serving.device is Device.CPU:
        return Precision.AUTO.value
    precision = resolve_precision(serving.precision, serving.device)
    quantization = resolve_quantization(serving.quantization, precision)
    return weights_label(precision.value, None if quantization is None else quantization.value)


def export_done(onnx_dir: Path, wanted: str) -> bool:
    """The exporter writes `export.json` with `ok: true` only after verifying the model; an
    `Auto` export counts for `Auto` only, a named precision for that precision only."""
    report = ExportReport.read(onnx_dir / "export.json")
    return report is not None and report.ok and (report.requested or report.weights) == wanted
