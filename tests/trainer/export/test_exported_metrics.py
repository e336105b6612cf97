"""The exported weights are judged on the run's task metrics (`heldout.json`'s task), in ONNX
Runtime: export.json's `metrics` are what will serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.dataplane import ExportReport
from kubetune.api.metrics import Metric, MetricScores, Task
from kubetune_trainer.export import auto
from kubetune_trainer.heldout import HeldOut
from tests.trainer.conftest import QA
from tests.trainer.export.test_auto import exported, run_directory


def test_an_fp32_export_scores_the_task_metrics_pytorch_scores(tmp_path: Path) -> None:
    run = run_directory(tmp_path, with_answers=True)
    held_out = HeldOut.read(run)
    assert held_out is not None
    held_out.task = Task.EXTRACTION
    held_out.write(run)
    data = ExportReport.model_validate(exported(run, tmp_path / "onnx", "--precision", "FP32"))
    assert data.ok and data.metrics is not None
    assert set(data.metrics.values) == {Metric.EXACT_MATCH, Metric.TOKEN_F1, Metric.EVAL_LOSS,
                                        Metric.PERPLEXITY}  # references are not JSON
    assert data.metrics.records == len(QA)
    # FP32 matches PyTorch token for token: PyTorch's answers and loss are the exported ones.
    reference = auto.torch_reference(run / "merged", held_out)
    assert data.metrics.values[Metric.EXACT_MATCH] == reference.score.accuracy
    assert data.metrics.values[Metric.EVAL_LOSS] == pytest.approx(reference.score.loss, abs=1e-3)
    assert "evaluateSeconds" in data.timings


def test_the_export_short_form_keeps_the_metric_values_only() -> None:
    metrics = MetricScores(values={Metric.MACRO_F1: 0.5}, per_label_f1={"a": 0.5},
                           signatures={Metric.CHRF: "nrefs:1"}, records=3)
    short = ExportReport.parse(ExportReport(ok=True, metrics=metrics).short_form())
    assert short is not None and short.metrics == MetricScores(values={Metric.MACRO_F1: 0.5},
                                                               records=3)
