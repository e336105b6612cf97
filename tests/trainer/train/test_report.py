"""Progress POSTs, termination message, report.json and configuration errors (no training)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, JudgeCounts, TrainingReport
from kubetune.api.metrics import Metric, MetricScores, Task
from kubetune.reconcile.status import metrics_status
from kubetune_trainer.train import report as reports
from kubetune_trainer.train import run as train
from tests.trainer.conftest import run_config


class Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]] = []
    arrived = threading.Event()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.headers.get("Authorization", ""), body))
        type(self).arrived.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.received = []
    Collector.arrived = threading.Event()
    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/progress"
    server.shutdown()


BODY = {"step": 1, "totalSteps": 2, "epoch": 0.5, "trainLoss": 1.0, "evalLoss": None,
        "tokensPerSecond": 10.0, "etaSeconds": 3}


def test_progress_reaches_the_endpoint_with_the_bearer_token(tmp_path: Path,
                                                            collector: str) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    reporter = reports.Reporter(collector, str(token), interval=3600)
    reporter.offer(BODY)
    reporter.offer({**BODY, "step": 2})  # throttled: within the interval
    reporter.offer({**BODY, "step": 2}, force=True)  # the final step always goes out
    reporter.close()
    assert Collector.arrived.is_set()
    assert [(auth, body["step"]) for auth, body in Collector.received] == [
        ("Bearer s3cret", 1), ("Bearer s3cret", 2)]
    assert set(Collector.received[0][1]) == set(BODY)


def test_dead_endpoint_never_raises() -> None:
    reporter = reports.Reporter("http://127.0.0.1:9/nowhere", None, interval=0)
    reporter.offer(BODY)
    reporter.offer(BODY)
    reporter.close()
    assert reporter.warned


def test_report_and_short_termination_message(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    report = TrainingReport(error="x" * 10000, steps=3)
    reports.write_final(tmp_path / "out", report)
    assert TrainingReport.read(tmp_path / "out" / "report.json") == report
    short = termination.read_bytes()
    assert len(short) <= reports.TERMINATION_LIMIT
    assert json.loads(short)["steps"] == 3
    # What the operator reads back from the termination message (reconcile.runs).
    parsed = TrainingReport.parse(short.decode())
    assert parsed is not None and parsed.steps == 3 and parsed.error.endswith("...")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "missing" / "log"))
    reports.write_final(tmp_path / "out", report)  # not writable: skipped silently


def _scores(seed: float, labels: int, label_length: int) -> MetricScores:
    """Every metric there is, each value with a float's longest repr."""
    return MetricScores(
        values={metric: seed / (n + 7) for n, metric in enumerate(Metric)},
        per_label_f1={f"{n:03d}".ljust(label_length, "l"): seed / (n + 3)
                      for n in range(labels)},
        signatures={Metric.CHRF: "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.5.1",
                    Metric.BLEU: "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1"},
        records=100000,
    )


def test_the_short_form_carries_the_largest_metric_set() -> None:
    """The most a report can hold (every metric, 256 labels of 253 characters, signatures,
    a long error and plan mismatch): the metric values of both models stay whole, what does
    not fit goes (report.json keeps it), and the message fits the kubelet's 4096 bytes."""
    fine_tuned, base = _scores(1.0, 256, 253), _scores(0.5, 256, 253)
    report = TrainingReport(
        status="Failed", error="e" * 10000, plan_mismatch="p" * 3000, steps=3,
        eval_loss=1 / 3, base_eval_loss=2 / 3, accuracy=1 / 7, base_accuracy=1 / 9,
        task=Task.CLASSIFICATION, metrics=fine_tuned, base_metrics=base,
    )
    short = reports.short_form(report)
    assert len(short.encode()) <= reports.TERMINATION_LIMIT
    parsed = TrainingReport.parse(short)
    assert parsed is not None and parsed.metrics is not None and parsed.base_metrics is not None
    assert parsed.task is Task.CLASSIFICATION
    assert parsed.metrics.values == fine_tuned.values
    assert parsed.base_metrics.values == base.values
    assert len(parsed.metrics.values) == len(Metric)
    assert parsed.metrics.per_label_f1 == {} and parsed.eval_loss == 1 / 3
    assert parsed.error is not None and parsed.error.startswith("eee")
    assert parsed.error.endswith("...")


def test_the_short_form_keeps_a_few_labels_f1_and_the_signatures() -> None:
    report = TrainingReport(status="Succeeded", steps=3, task=Task.CLASSIFICATION,
                            metrics=_scores(1.0, 8, 12), base_metrics=_scores(0.5, 8, 12))
    parsed = TrainingReport.parse(reports.short_form(report))
    assert parsed is not None and parsed.metrics is not None
    assert parsed.metrics == report.metrics and parsed.base_metrics == report.base_metrics


def _main(tmp_path: Path, document: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict]:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    config = tmp_path / "run.json"
    config.write_text(document if isinstance(document, str) else json.dumps(document))
    code = train.main(["--config", str(config), "--output", str(tmp_path / "out")])
    return code, json.loads((tmp_path / "out" / "report.json").read_text())


def test_invalid_run_config_exits_2_naming_the_field(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tiny_dataset: tuple[Path, Path]) -> None:
    document = run_config(*tiny_dataset)
    document["spec"]["training"]["learningRate"] = "fast"
    code, report = _main(tmp_path, document, monkeypatch)
    assert code == CONFIG_ERROR_EXIT_CODE
    assert report["status"] == "Failed"
    assert "spec.training.learningRate" in report["error"]
    code, report = _main(tmp_path, '{"name": "x",\n "spec": }', monkeypatch)
    assert code == CONFIG_ERROR_EXIT_CODE and "run.json:2:" in report["error"]


def test_bad_dataset_line_exits_2_before_the_model_loads(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         tiny_dataset: tuple[Path, Path]) -> None:
    train_file, validation = tiny_dataset
    with train_file.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    from kubetune_trainer.train import model

    monkeypatch.setattr(model, "load_base", lambda *a, **k: pytest.fail("model loaded"))
    code, report = _main(tmp_path, run_config(train_file, validation), monkeypatch)
    assert code == CONFIG_ERROR_EXIT_CODE
    assert report["error"] == f"{train_file}:5: no assistant message: nothing to learn from " \
                              "(format Chat)"
    assert json.loads((tmp_path / "termination-log").read_text())["status"] == "Failed"


def test_undecodable_dataset_line_exits_2_naming_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        tiny_dataset: tuple[Path, Path]) -> None:
    # json.loads raises a plain ValueError (not JSONDecodeError) for an integer of more than
    # 4300 digits: once exit code 1, retried as a crash, with no file:line.
    train_file, validation = tiny_dataset
    with train_file.open("a") as handle:
        handle.write('{"text": "x", "tokens": ' + "7" * 5000 + "}\n")
    code, report = _main(tmp_path, run_config(train_file, validation), monkeypatch)
    assert code == CONFIG_ERROR_EXIT_CODE
    assert report["error"].startswith(f"{train_file}:5: ")


def test_the_judges_win_rate_reaches_status_beside_the_loss() -> None:
    """The operator reads the termination message: the win rate rides in `metrics` (the gate
    and `status.evaluation.metrics` read it), the counts stay in report.json."""
    report = TrainingReport(
        status="Succeeded", task=Task.CHAT, eval_loss=1.0, base_eval_loss=1.5,
        metrics=MetricScores(values={Metric.EVAL_LOSS: 1.0, Metric.JUDGE_WIN_RATE: 0.75}),
        base_metrics=MetricScores(values={Metric.EVAL_LOSS: 1.5}),
        judge=JudgeCounts(endpoint="https://judge.example/v1", model="big", records=2,
                          comparisons=4, wins=3, ties=0, losses=1))
    short = TrainingReport.parse(reports.short_form(report))
    assert short is not None and short.judge is None
    rows = {row["name"]: row for row in metrics_status(Task.CHAT, short, None)}
    assert rows["judgeWinRate"] == {"name": "judgeWinRate", "fineTuned": "0.75"}
    assert rows["evalLoss"]["base"] == "1.5"
