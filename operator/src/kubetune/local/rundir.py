"""The run directory of `kubetune run`: atomic JSON files and what they say is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.api import RunConfig


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves half a file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def training_done(run_dir: Path) -> bool:
    """The trainer writes `report.json` last, with status Succeeded once `merged/` is saved."""
    report = read_json(run_dir / "report.json") or {}
    return report.get("status") == "Succeeded" and (run_dir / "merged").is_dir()


def export_precision(config: RunConfig) -> str:
    """The precision the exporter will use: `Auto` is INT4 on CPU and FP16 on CUDA."""
    serving = config.spec.serving
    if serving.precision.value != "Auto":
        return serving.precision.value
    return "INT4" if serving.device.value == "CPU" else "FP16"


def export_done(onnx_dir: Path, precision: str) -> bool:
    """The exporter writes `export.json` with `ok: true` only after verifying the model."""
    report = read_json(onnx_dir / "export.json") or {}
    return report.get("ok") is True and report.get("precision") == precision
