"""The evaluation gate on task metrics: every kind of bound, in each metric's direction, and
the comparisons with the base and the serving model on the task's primary metric."""

from __future__ import annotations

import math

import pytest

from kubetune.api.dataplane import TrainingReport
from kubetune.api.metrics import Metric, MetricScores, Task
from kubetune.api.spec import GateSpec
from kubetune.reconcile.gate import compared_metric, evaluate_gate, fine_tuned_scores

M = Metric


def _report(fine_tuned: dict[Metric, float], base: dict[Metric, float] | None = None,
            **fields: float) -> TrainingReport:
    return TrainingReport(
        status="Succeeded",
        metrics=MetricScores(values=fine_tuned),
        base_metrics=MetricScores(values=base or {}),
        **fields,
    )


TRANSLATION = _report({M.CHRF: 58.2, M.BLEU: 31.0, M.EVAL_LOSS: 0.9},
                      {M.CHRF: 40.1, M.BLEU: 18.0, M.EVAL_LOSS: 1.6})
CLASSIFICATION = _report({M.ACCURACY: 0.8, M.MACRO_F1: 0.72, M.OUT_OF_LABELS: 0.05},
                         {M.ACCURACY: 0.3, M.MACRO_F1: 0.21, M.OUT_OF_LABELS: 0.4})
NO_BASE = GateSpec(must_beat_base=False)


@pytest.mark.parametrize(("task", "report", "bounds", "passed", "says"), [
    # A lower bound on a higher-is-better metric.
    (Task.TRANSLATION, TRANSLATION, {"min": {M.CHRF: "55"}}, True, "chrF 58.2 >= 55"),
    (Task.TRANSLATION, TRANSLATION, {"min": {M.CHRF: "60"}}, False, "chrF 58.2 < min 60"),
    (Task.CLASSIFICATION, CLASSIFICATION, {"min": {M.MACRO_F1: "0.8"}}, False,
     "macroF1 0.72 < min 0.8"),
    # An upper bound on a lower-is-better metric.
    (Task.CLASSIFICATION, CLASSIFICATION, {"max": {M.OUT_OF_LABELS: "0.1"}}, True,
     "outOfLabels 0.05 <= 0.1"),
    (Task.CLASSIFICATION, CLASSIFICATION, {"max": {M.OUT_OF_LABELS: "0.01"}}, False,
     "outOfLabels 0.05 > max 0.01"),
    (Task.TRANSLATION, TRANSLATION, {"max": {M.EVAL_LOSS: "0.5"}}, False,
     "evalLoss 0.9000 > max 0.5"),
    # A bound at the value holds: min and max include it.
    (Task.TRANSLATION, TRANSLATION, {"min": {M.BLEU: "31"}, "max": {M.BLEU: "31"}}, True,
     "bleu 31 >= 31; bleu 31 <= 31"),
    # Several bounds: every failure is named, not only the first.
    (Task.TRANSLATION, TRANSLATION, {"min": {M.CHRF: "60", M.BLEU: "40"}}, False,
     "chrF 58.2 < min 60; bleu 31 < min 40"),
])
def test_a_bound_on_any_metric_is_checked_in_its_direction(
    task: Task, report: TrainingReport, bounds: dict[str, dict[Metric, str]], passed: bool,
    says: str,
) -> None:
    gate = GateSpec.model_validate({**bounds, "mustBeatBase": False})
    verdict, message = evaluate_gate(gate, task, report, None)
    assert verdict is passed, message
    assert says in message


def test_a_bound_on_a_metric_that_was_not_measured_fails() -> None:
    report = _report({M.CHRF: 58.2})  # the trainer could not score BLEU
    gate = GateSpec.model_validate({"min": {M.BLEU: "10"}, "mustBeatBase": False})
    passed, message = evaluate_gate(gate, Task.TRANSLATION, report, None)
    assert not passed
    assert "bleu was not measured" in message


def test_a_report_without_task_metrics_fails_a_bound_on_one() -> None:
    """A trainer from before task metrics reports evalLoss and accuracy only."""
    report = TrainingReport(status="Succeeded", eval_loss=0.4, base_eval_loss=2.0)
    gate = GateSpec.model_validate({"min": {M.MACRO_F1: "0.5"}})
    passed, message = evaluate_gate(gate, Task.CLASSIFICATION, report, None)
    assert not passed
    assert "macroF1 was not measured" in message


def test_the_older_fields_count_as_their_metrics() -> None:
    """evalLoss and accuracy reported the old way answer bounds on evalLoss, perplexity and
    exactMatch (perplexity is exp(evalLoss))."""
    report = TrainingReport(status="Succeeded", eval_loss=0.4, base_eval_loss=2.0, accuracy=0.85)
    assert fine_tuned_scores(report) == {
        M.EVAL_LOSS: 0.4, M.PERPLEXITY: pytest.approx(math.exp(0.4)), M.EXACT_MATCH: 0.85}
    gate = GateSpec.model_validate({"max": {M.PERPLEXITY: "1.4"}, "min": {M.EXACT_MATCH: "0.9"}})
    passed, message = evaluate_gate(gate, Task.GENERATION, report, None)
    assert not passed
    assert "perplexity 1.4918 > max 1.4" in message and "exactMatch 0.85 < min 0.9" in message


@pytest.mark.parametrize(("gate", "report", "passed", "says"), [
    (GateSpec(max_eval_loss="1"), _report({M.EVAL_LOSS: 0.9}), True, "evalLoss 0.9000 <= 1"),
    (GateSpec(max_eval_loss="0.5"), _report({M.EVAL_LOSS: 0.9}), False,
     "evalLoss 0.9000 > maxEvalLoss 0.5"),
    # minAccuracy is the exact-match share of the validation answers, whatever the task: a
    # classifier's label accuracy in `metrics` does not stand in for it.
    (GateSpec(min_accuracy="0.5"), _report({M.ACCURACY: 0.9}), False,
     "accuracy was not measured"),
    (GateSpec(min_accuracy="0.5"), _report({M.ACCURACY: 0.9}, accuracy=0.6), True,
     "accuracy 0.600 >= 0.5"),
])
def test_max_eval_loss_and_min_accuracy_keep_their_meaning(
    gate: GateSpec, report: TrainingReport, passed: bool, says: str
) -> None:
    no_base = gate.model_copy(update={"must_beat_base": False})
    verdict, message = evaluate_gate(no_base, Task.CLASSIFICATION, report, None)
    assert verdict is passed, message
    assert says in message


@pytest.mark.parametrize(("task", "metric"), [
    (Task.GENERATION, M.EVAL_LOSS),  # not exactMatch: kept from before tasks
    (Task.CLASSIFICATION, M.MACRO_F1),
    (Task.EXTRACTION, M.TOKEN_F1),
    (Task.TRANSLATION, M.CHRF),
    (Task.SUMMARIZATION, M.ROUGE_L),
    (Task.CHAT, M.EVAL_LOSS),
])
def test_the_comparisons_use_the_tasks_primary_metric(task: Task, metric: Metric) -> None:
    assert compared_metric(task) is metric


@pytest.mark.parametrize(("task", "fine_tuned", "base", "passed", "says"), [
    # Higher is better: a lower validation loss does not make up for a worse macroF1.
    (Task.CLASSIFICATION, {M.MACRO_F1: 0.5, M.EVAL_LOSS: 0.3},
     {M.MACRO_F1: 0.6, M.EVAL_LOSS: 2.0}, False, "macroF1 0.5 does not beat the base 0.6"),
    (Task.CLASSIFICATION, {M.MACRO_F1: 0.7}, {M.MACRO_F1: 0.6}, True,
     "macroF1 0.7 beats the base 0.6"),
    (Task.TRANSLATION, {M.CHRF: 40.0}, {M.CHRF: 40.0}, False, "does not beat"),  # a tie
    (Task.SUMMARIZATION, {M.ROUGE_L: 0.41}, {M.ROUGE_L: 0.3}, True, "rougeL 0.41 beats"),
    # Lower is better.
    (Task.CHAT, {M.EVAL_LOSS: 1.2}, {M.EVAL_LOSS: 1.1}, False,
     "evalLoss 1.2000 does not beat the base 1.1000"),
    (Task.CHAT, {M.EVAL_LOSS: 1.0}, {M.EVAL_LOSS: 1.1}, True, "evalLoss 1.0000 beats"),
    # Generation compares the loss even when exact match got worse.
    (Task.GENERATION, {M.EVAL_LOSS: 0.5, M.EXACT_MATCH: 0.1},
     {M.EVAL_LOSS: 1.5, M.EXACT_MATCH: 0.2}, True, "evalLoss 0.5000 beats the base"),
    # The base model's primary metric was not measured: no comparison, no pass.
    (Task.EXTRACTION, {M.TOKEN_F1: 0.8}, {}, False,
     "tokenF1 of the fine-tuned and the base model are needed"),
])
def test_must_beat_base_compares_the_primary_metric(
    task: Task, fine_tuned: dict[Metric, float], base: dict[Metric, float], passed: bool,
    says: str,
) -> None:
    verdict, message = evaluate_gate(GateSpec(), task, _report(fine_tuned, base), None)
    assert verdict is passed, message
    assert says in message


@pytest.mark.parametrize(("serving", "passed", "says"), [
    (None, True, "no bound set"),  # nothing serves yet
    (MetricScores(values={M.MACRO_F1: 0.8}), False,
     "macroF1 0.72 does not beat the serving model's 0.8"),
    (MetricScores(values={M.MACRO_F1: 0.72}), False, "does not beat the serving model's"),
    (MetricScores(values={M.MACRO_F1: 0.6, M.EVAL_LOSS: 0.1}), True,
     "macroF1 0.72 beats the serving model's 0.6"),
    # Judged under another task (or by an older operator): nothing to beat, and it says so.
    (MetricScores(values={M.EVAL_LOSS: 0.1}), True,
     "the serving model has no macroF1 recorded, not compared"),
])
def test_must_beat_serving_compares_the_primary_metric(
    serving: MetricScores | None, passed: bool, says: str
) -> None:
    gate = GateSpec(must_beat_base=False, must_beat_serving=True)
    verdict, message = evaluate_gate(gate, Task.CLASSIFICATION, CLASSIFICATION, serving)
    assert verdict is passed, message
    assert says in message


def test_must_beat_serving_in_a_lower_is_better_direction() -> None:
    gate = GateSpec(must_beat_base=False, must_beat_serving=True)
    report = _report({M.EVAL_LOSS: 0.8})
    assert evaluate_gate(gate, Task.CHAT, report, MetricScores(values={M.EVAL_LOSS: 0.9}))[0]
    passed, message = evaluate_gate(gate, Task.CHAT, report,
                                    MetricScores(values={M.EVAL_LOSS: 0.7}))
    assert not passed
    assert "evalLoss 0.8000 does not beat the serving model's 0.7000" in message


def test_no_gate_passes_whatever_was_measured() -> None:
    assert evaluate_gate(None, Task.TRANSLATION, TrainingReport(), None) == (
        True, "no gate configured")
