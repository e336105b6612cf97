"""The typed seam between the planes: one definition of each report, rule and exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.dataplane import (
    ExportReport,
    ProgressReport,
    TrainingReport,
    resolve_precision,
    resolve_quantization,
    weights_label,
)
from kubetune.api.metrics import exact_match
from kubetune.api.spec import Precision, Quantization


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("Auto", "CPU", Precision.INT4), ("auto", "cuda", Precision.FP16),
    ("INT4", "CUDA", Precision.INT4), ("fp32", "CPU", Precision.FP32),
    (Precision.FP16, "CUDA", Precision.FP16),
])
def test_auto_precision_is_int4_on_cpu_and_fp16_on_cuda(precision: str, device: str,
                                                        expected: Precision) -> None:
    assert resolve_precision(precision, device) is expected


@pytest.mark.parametrize(("precision", "device", "named"), [
    ("FP16", "CPU", "CUDA only"), ("INT3", "CPU", "INT3"), ("Auto", "TPU", "TPU"),
    ("INT8", "CUDA", "CPU only"),
])
def test_a_bad_precision_or_device_is_named(precision: str, device: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        resolve_precision(precision, device)


def test_int4_rounds_with_rtn_unless_told_and_nothing_else_takes_a_method() -> None:
    assert resolve_quantization(None, Precision.INT4) is Quantization.RTN
    assert resolve_quantization("kquantmixed", Precision.INT4) is Quantization.K_QUANT_MIXED
    assert resolve_quantization(None, Precision.INT8) is None
    with pytest.raises(ValueError, match="INT4 only"):
        resolve_quantization("KQuant", Precision.INT8)
    with pytest.raises(ValueError, match="AWQ"):
        resolve_quantization("AWQ", Precision.INT4)


def test_weights_labels_keep_the_names_exports_had_before_the_method_choice() -> None:
    assert weights_label("INT4", None) == weights_label("INT4", "RTN") == "INT4"
    assert weights_label("INT4", "KQuant") == "INT4-KQuant"
    assert ExportReport(precision="INT4", quantization="RTNLast").weights == "INT4-RTNLast"


@pytest.mark.parametrize(("answer", "reference", "matches"), [
    ("kubectl get pods -n prod", "kubectl get pods -n prod", True),
    ("  kubectl   get pods\n-n prod ", "kubectl get pods -n prod", True),
    ("```bash\nkubectl get pods -n prod\n```", "kubectl get pods -n prod", True),
    ("`kubectl get pods -n prod`", "kubectl get pods -n prod", True),
    ("kubectl get pods -n dev", "kubectl get pods -n prod", False),
    ("", "kubectl get pods", False),
])
def test_exact_match_ignores_whitespace_and_code_fences_only(answer: str, reference: str,
                                                             matches: bool) -> None:
    assert exact_match(answer, reference) is matches


def test_a_training_report_reads_its_short_form_and_ignores_what_it_does_not_know() -> None:
    message = json.dumps({"status": "Succeeded", "steps": 6, "evalLoss": 0.5, "newKey": 1})
    report = TrainingReport.parse(message)
    assert report is not None and report.succeeded and report.steps == 6
    assert report.eval_loss == 0.5 and report.accuracy is None


@pytest.mark.parametrize("message", [None, "", "OOMKilled", "[1, 2]", '{"steps": "many"}'])
def test_a_termination_message_that_is_no_report_reads_as_none(message: str | None) -> None:
    assert TrainingReport.parse(message) is None


def test_reports_round_trip_through_their_files(tmp_path: Path) -> None:
    report = TrainingReport(status="Succeeded", steps=3, test_split="/data/test.jsonl")
    (tmp_path / "report.json").write_text(report.to_json())
    assert json.loads(report.to_json())["testSplit"] == "/data/test.jsonl"
    assert TrainingReport.read(tmp_path / "report.json") == report
    assert TrainingReport.read(tmp_path / "missing.json") is None
    export = ExportReport(ok=True, precision="INT4", sizes={"modelBytes": 10})
    (tmp_path / "export.json").write_text(export.to_json())
    assert ExportReport.read(tmp_path / "export.json") == export


def test_progress_reports_refuse_negative_steps() -> None:
    with pytest.raises(ValueError, match="step"):
        ProgressReport.model_validate({"step": -1})
    assert ProgressReport.model_validate({"step": 2, "totalSteps": 4}).total_steps == 4
