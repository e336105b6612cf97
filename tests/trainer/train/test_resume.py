"""Checkpoints are atomic, pruned, and a crashed run resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.train import checkpoint
from kubetune_trainer.train.loop import CRASH_ENV
from tests.trainer.conftest import metrics, report, run_config, start_training, succeeded


def test_incomplete_checkpoints_are_never_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        directory = root / checkpoint.directory_name(step)
        directory.mkdir(parents=True)
        if complete:
            (directory / checkpoint.MARKER).write_text("ok\n")
    (root / ".tmp-step-00000008").mkdir()
    assert checkpoint.newest(root) == root / "step-00000004"
    found = checkpoint.complete_checkpoints(root)
    assert checkpoint.to_delete(found, keep=1) == [root / "step-00000002"]
    assert checkpoint.to_delete(found, keep=3) == []


def test_crashed_run_resumes_from_its_checkpoint(tmp_path: Path, lora_reference: Path) -> None:
    """Same config as the reference run; the first attempt dies right after step 3."""
    from tests.trainer.conftest import write_tiny_dataset

    train, _ = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, None, steps=4)  # evaluation does not change training
    config["spec"]["checkpoint"] = {"everySteps": 2, "keep": 1}
    output = tmp_path / "out"
    crashed = start_training(config, output, env={CRASH_ENV: "3"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    assert not (output / "report.json").exists()
    assert checkpoint.newest(output / "checkpoints") == output / "checkpoints" / "step-00000002"

    succeeded(start_training(config, output))
    final = report(output)
    assert final["resumedFromStep"] == 2
    assert final["steps"] == report(lora_reference)["steps"] == 4
    assert final["trainLoss"] == pytest.approx(report(lora_reference)["trainLoss"], rel=1e-3)
    steps = [m["step"] for m in metrics(output)]
    assert steps == [1, 2, 3, 3, 4]  # step 3 ran twice: once before the crash
