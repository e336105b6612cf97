"""Progress POSTs, termination message, report.json and configuration errors (no training)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, TrainingReport
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
