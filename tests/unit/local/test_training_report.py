"""What `kubetune run` prints after training: the figures, and what the user must know."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.dataplane import TrainingReport
from kubetune.local.run import print_training_report


def test_a_template_that_dropped_system_messages_is_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = TrainingReport.model_validate(
        {"status": "Succeeded", "trainRecords": 600, "systemDroppedRecords": 600,
         "evalLoss": 0.5})
    print_training_report(report, tmp_path)
    printed = capsys.readouterr().err
    assert "validation loss" in printed
    assert "left out the system message of 600 of 600 training records" in printed


def test_nothing_is_said_when_nothing_was_dropped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    print_training_report(TrainingReport(status="Succeeded", train_records=5), tmp_path)
    assert "system message" not in capsys.readouterr().err


def test_the_judges_record_is_printed_beside_its_win_rate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = TrainingReport.model_validate({
        "status": "Succeeded", "task": "Chat",
        "metrics": {"values": {"judgeWinRate": 0.625, "evalLoss": 1.5}, "records": 4},
        "baseMetrics": {"values": {"evalLoss": 2.0}, "records": 4},
        "judge": {"endpoint": "https://judge.example/v1", "model": "big", "records": 4,
                  "comparisons": 8, "wins": 4, "losses": 2, "ties": 2, "unparsed": 1}})
    print_training_report(report, tmp_path)
    printed = capsys.readouterr().err
    assert "judgeWinRate" in printed and "0.6250" in printed
    assert ("judge big (https://judge.example/v1): fine-tuned vs base 4 wins, 2 losses, 2 ties "
            "(1 unparsed) in 8 comparisons of 4 records") in printed
