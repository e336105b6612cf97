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
