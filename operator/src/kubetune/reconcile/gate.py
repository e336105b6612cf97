"""The evaluation gate: may a newly trained model replace the one serving now?

One pure function, used by the operator (before it rolls the inference Deployment) and by
`kubetune run` (before it serves locally), so both decide the same way from the same numbers.
It reads every metric by name (`kubetune.api.metrics`), so a bound on chrF or macroF1 is
checked as a bound on the loss is, in the metric's own direction.
"""

from __future__ import annotations

import math

from kubetune.api.dataplane import TrainingReport
from kubetune.api.metrics import (
    COMPARED_METRIC,
    LOWER_IS_BETTER,
    Metric,
    MetricScores,
    Task,
    beats,
)
from kubetune.api.spec import GateSpec


def compared_metric(task: Task) -> Metric:
    """What `mustBeatBase` and `mustBeatServing` compare (`COMPARED_METRIC`)."""
    return COMPARED_METRIC[task]


def _scores(
    scores: MetricScores | None, eval_loss: float | None, accuracy: float | None
) -> dict[Metric, float]:
    """One model's measured metrics: its `MetricScores`, completed from the report's older
    fields (a trainer that predates task metrics reports only `evalLoss` and `accuracy`)."""
    values = dict(scores.values) if scores is not None else {}
    if eval_loss is not None:
        values.setdefault(Metric.EVAL_LOSS, eval_loss)
        if eval_loss < 700:  # exp() of more overflows a float: no perplexity to speak of
            values.setdefault(Metric.PERPLEXITY, math.exp(eval_loss))
    if accuracy is not None:
        values.setdefault(Metric.EXACT_MATCH, accuracy)
    return values


def fine_tuned_scores(report: TrainingReport) -> dict[Metric, float]:
    """The fine-tuned model's metrics on the validation records."""
    return _scores(report.metrics, report.eval_loss, report.accuracy)


def base_scores(report: TrainingReport) -> dict[Metric, float]:
    """The base model's metrics on the same records."""
    return _scores(report.base_metrics, report.base_eval_loss, report.base_accuracy)


def format_score(metric: Metric, value: float) -> str:
    """A metric's value in a sentence: losses to 4 decimals, the rest to 4 digits."""
    return f"{value:.4f}" if metric in LOWER_IS_BETTER - {Metric.OUT_OF_LABELS} else f"{value:.4g}"


def evaluate_gate(
    gate: GateSpec | None,
    task: Task,
    report: TrainingReport,
    serving: MetricScores | None,
) -> tuple[bool, str]:
    """Check a trainer report against the gate, for a job of evaluation `task`.

    `serving` holds the scores of the model serving now, or None when nothing serves yet
    (then `mustBeatServing` holds trivially). A bound whose metric was not measured fails: a
    gate the user asked for is never passed silently.
    """
    if gate is None:
        return True, "no gate configured"
    fine_tuned, base = fine_tuned_scores(report), base_scores(report)
    failures: list[str] = []
    checks: list[str] = []

    if gate.max_eval_loss is not None:
        bound = float(gate.max_eval_loss)
        eval_loss = fine_tuned.get(Metric.EVAL_LOSS)
        if eval_loss is None:
            failures.append("evalLoss was not measured (no validation data)")
        elif eval_loss > bound:
            failures.append(f"evalLoss {eval_loss:.4f} > maxEvalLoss {bound:g}")
        else:
            checks.append(f"evalLoss {eval_loss:.4f} <= {bound:g}")
    if gate.min_accuracy is not None:
        bound = float(gate.min_accuracy)
        if report.accuracy is None:
            failures.append("accuracy was not measured (validation records need answers)")
        elif report.accuracy < bound:
            failures.append(f"accuracy {report.accuracy:.3f} < minAccuracy {bound:g}")
        else:
            checks.append(f"accuracy {report.accuracy:.3f} >= {bound:g}")
    for kind, bounds in (("min", gate.min_bounds), ("max", gate.max_bounds)):
        for metric, text in (bounds or {}).items():
            bound, value = float(text), fine_tuned.get(metric)
            if value is None:
                failures.append(f"{metric} was not measured (bounded by {kind})")
                continue
            shown = f"{metric} {format_score(metric, value)}"
            if (value < bound) if kind == "min" else (value > bound):
                failures.append(f"{shown} {'<' if kind == 'min' else '>'} {kind} {bound:g}")
            else:
                checks.append(f"{shown} {'>=' if kind == 'min' else '<='} {bound:g}")

    compared = compared_metric(task)
    mine = fine_tuned.get(compared)
    if gate.must_beat_base:
        theirs = base.get(compared)
        if mine is None or theirs is None:
            failures.append(
                f"{compared} of the fine-tuned and the base model are needed to compare them"
            )
        elif not beats(compared, mine, theirs):
            failures.append(f"{compared} {format_score(compared, mine)} does not beat the base "
                            f"{format_score(compared, theirs)}")
        else:
            checks.append(f"{compared} {format_score(compared, mine)} beats the base "
                          f"{format_score(compared, theirs)}")
    if gate.must_beat_serving and serving is not None:
        theirs = serving.values.get(compared)
        if theirs is None:
            # Judged under another task or by an older operator: there is nothing to beat,
            # and refusing every model for ever would leave no way forward but a new job.
            checks.append(f"the serving model has no {compared} recorded, not compared")
        elif mine is None:
            failures.append(f"{compared} is needed to compare with the serving model")
        elif not beats(compared, mine, theirs):
            failures.append(f"{compared} {format_score(compared, mine)} does not beat the "
                            f"serving model's {format_score(compared, theirs)}")
        else:
            checks.append(f"{compared} {format_score(compared, mine)} beats the serving "
                          f"model's {format_score(compared, theirs)}")

    if failures:
        return False, "gate failed: " + "; ".join(failures)
    return True, "gate passed: " + ("; ".join(checks) if checks else "no bound set")
