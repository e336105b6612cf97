"""docs/evaluation.md: its manifest is valid, and the gate words a failure as it shows."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kubetune.api import parse_finetunejob
from kubetune.api.dataplane import TrainingReport
from kubetune.api.metrics import Metric, MetricScores, Task
from kubetune.reconcile.gate import evaluate_gate

DOC = Path(__file__).parents[3] / "docs" / "evaluation.md"


def test_the_documented_manifest_is_valid_and_its_gate_fails_as_documented() -> None:
    text = DOC.read_text()
    block, _ = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    job = parse_finetunejob(yaml.safe_load(block), source=str(DOC))
    assert job.spec.evaluation.task is Task.CLASSIFICATION
    gate = job.spec.serving.gate
    assert gate is not None and gate.min_bounds == {Metric.MACRO_F1: "0.7"}
    worse = TrainingReport(
        status="Succeeded",
        metrics=MetricScores(values={Metric.MACRO_F1: 0.41, Metric.OUT_OF_LABELS: 0.0}),
        base_metrics=MetricScores(values={Metric.MACRO_F1: 0.2}),
    )
    passed, message = evaluate_gate(gate, Task.CLASSIFICATION, worse, None)
    assert not passed
    assert f"# generation 2: {message}; generation 1 keeps serving" in text


def test_the_documented_judged_chat_manifest_is_valid_and_gates_on_the_win_rate() -> None:
    _, block = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    job = parse_finetunejob(yaml.safe_load(block), source=str(DOC))
    evaluation = job.spec.evaluation
    assert evaluation.task is Task.CHAT and evaluation.judge is not None
    assert evaluation.judge.api_key_secret_ref is not None
    gate = job.spec.serving.gate
    assert gate is not None and gate.min_bounds == {Metric.JUDGE_WIN_RATE: "0.55"}
    tie = TrainingReport(status="Succeeded", metrics=MetricScores(values={
        Metric.JUDGE_WIN_RATE: 0.5, Metric.EVAL_LOSS: 1.0}),
        base_metrics=MetricScores(values={Metric.EVAL_LOSS: 1.2}))
    passed, message = evaluate_gate(gate, Task.CHAT, tie, None)
    assert not passed and "judgeWinRate 0.5 < min 0.55" in message
