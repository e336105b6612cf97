"""`kubetune_job_gate_passed`: the evaluation gate's verdict per job, read from status at
scrape time (the chart's KubeTuneGateRefusedModel alert reads it)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubetune.operator.metrics import OperatorMetrics, gate_verdicts


def _job(name: str, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    status = {"phase": "Failed", "evaluation": evaluation} if evaluation is not None else {}
    return {"metadata": {"namespace": "team", "name": name}, "status": status}


def _gate_samples(metrics: OperatorMetrics) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "kubetune_job_gate_passed":
                labels = sample.labels
                found[(labels["namespace"], labels["job"], labels["generation"])] = sample.value
    return found


def test_gate_verdicts_read_passed_and_the_evaluated_generation() -> None:
    bodies = [
        _job("refused", {"generation": 2, "passed": False, "message": "gate failed: ..."}),
        _job("passed", {"generation": 1, "passed": True}),
        _job("not-evaluated", {"generation": 1, "evalLoss": "1.2"}),
        _job("new", None),
    ]

    assert gate_verdicts(bodies) == [
        ("team", "passed", "1", True),
        ("team", "refused", "2", False),
    ]


def test_the_gauge_follows_the_index_and_a_deleted_job_leaves_no_series() -> None:
    bodies = [_job("refused", {"generation": 2, "passed": False}),
              _job("passed", {"generation": 1, "passed": True})]
    metrics = OperatorMetrics(finetunejobs=lambda: list(bodies))

    assert _gate_samples(metrics) == {("team", "refused", "2"): 0.0,
                                      ("team", "passed", "1"): 1.0}
    bodies.pop(0)
    assert _gate_samples(metrics) == {("team", "passed", "1"): 1.0}
