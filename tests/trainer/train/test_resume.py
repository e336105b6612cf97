"""Checkpoints are atomic, pruned, and a crashed run resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.train import checkpoint, evaluate
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


def test_a_crash_after_the_last_step_resumes_at_the_last_step(tmp_path: Path,
                                                               lora_reference: Path) -> None:
    """Issue 13, finding 13: the outputs (greedy evaluation, adapter, merged model) come after
    the last step; dying there (an eviction, an OOM in the evaluation) used to cost every step
    since the last `everySteps` multiple."""
    from tests.trainer.conftest import write_tiny_dataset

    train, _ = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, None, steps=4)
    config["spec"]["checkpoint"] = {"everySteps": 3, "keep": 1}
    output = tmp_path / "out"
    crashed = start_training(config, output, env={CRASH_ENV: "4"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    assert checkpoint.newest(output / "checkpoints") == output / "checkpoints" / "step-00000004"

    succeeded(start_training(config, output))
    final = report(output)
    assert final["status"] == "Succeeded" and final["resumedFromStep"] == 4
    assert final["steps"] == 4 and final["adapter"] == "adapter" and final["merged"] == "merged"
    assert final["trainLoss"] == pytest.approx(report(lora_reference)["trainLoss"], rel=1e-3)
    assert [m["step"] for m in metrics(output)] == [1, 2, 3, 4]  # no step trained twice


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(
        tmp_path: Path, lora_reference: Path) -> None:
    """Issue 13, finding 15: the newest checkpoint was taken with no fallback, so one torn file
    failed every retry."""
    from tests.trainer.conftest import write_tiny_dataset

    train, _ = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, None, steps=4)
    config["spec"]["checkpoint"] = {"everySteps": 1, "keep": 3}
    output = tmp_path / "out"
    crashed = start_training(config, output, env={CRASH_ENV: "3"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    state = output / "checkpoints" / "step-00000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    resumed = start_training(config, output)
    succeeded(resumed)
    assert "step-00000003 is unusable" in resumed.stderr
    final = report(output)
    assert final["resumedFromStep"] == 2 and final["steps"] == 4
    assert final["trainLoss"] == pytest.approx(report(lora_reference)["trainLoss"], rel=1e-3)
    assert [m["step"] for m in metrics(output)] == [1, 2, 3, 3, 4]


def test_training_goes_on_when_metrics_cannot_be_appended(tmp_path: Path,
                                                          builtin_model: Path) -> None:
    """Issue 13, finding 15: a failed `metrics.jsonl` append (a full disk) killed training."""
    from tests.trainer.conftest import write_tiny_dataset

    train, _ = write_tiny_dataset(tmp_path / "data")
    output = tmp_path / "out"
    (output / "metrics.jsonl").mkdir(parents=True)  # every append fails (IsADirectoryError)
    result = start_training(run_config(train, None, steps=2), output)
    succeeded(result)
    assert result.stderr.count("cannot append to") == 1
    assert report(output)["status"] == "Succeeded" and report(output)["steps"] == 2


def test_a_resumed_run_reads_the_base_evaluation_its_first_attempt_saved(
        tmp_path: Path) -> None:
    """The base model's greedy evaluation ran again at the start of every attempt: on a pod
    limited to 800m CPU each retry spent minutes re-measuring what the first one had measured.
    The saved figures are altered before the retry, so only reading them back can report them."""
    from tests.trainer.conftest import write_tiny_dataset

    train, validation = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, validation, steps=4)
    config["spec"]["checkpoint"] = {"everySteps": 2, "keep": 1}
    output = tmp_path / "out"
    crashed = start_training(config, output, env={CRASH_ENV: "3"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    saved_path = output / evaluate.BASE_EVALUATION
    saved = json.loads(saved_path.read_text())
    assert saved["evaluation"]["records"] == 2
    saved["evaluation"].update(loss=12.5, accuracy=0.25)
    saved_path.write_text(json.dumps(saved))

    succeeded(start_training(config, output))
    final = report(output)
    assert final["resumedFromStep"] == 2
    assert (final["baseEvalLoss"], final["baseAccuracy"]) == (12.5, 0.25)


def test_a_base_evaluation_of_other_inputs_is_not_reused(tmp_path: Path) -> None:
    from kubetune_trainer.train.data import Example
    from kubetune_trainer.train.encoding import Encoded

    records = [Encoded(input_ids=[1, 2, 3], labels=[-100, 2, 3], truncated=False)]
    examples = [Example(line=1, messages=(("user", "q"), ("assistant", "a")))]
    fingerprint = evaluate.base_fingerprint("model a", records, examples)
    path = tmp_path / evaluate.BASE_EVALUATION
    evaluate.save_base(path, fingerprint, evaluate.Evaluation(loss=1.5, accuracy=0.5, records=1))
    assert evaluate.saved_base(path, fingerprint) == evaluate.Evaluation(1.5, 0.5, 1)

    other_answer = [Example(line=1, messages=(("user", "q"), ("assistant", "b")))]
    other_tokens = [Encoded(input_ids=[1, 2, 4], labels=[-100, 2, 4], truncated=False)]
    for changed in (evaluate.base_fingerprint("model b", records, examples),
                    evaluate.base_fingerprint("model a", other_tokens, examples),
                    evaluate.base_fingerprint("model a", records, other_answer)):
        assert changed != fingerprint
        assert evaluate.saved_base(path, changed) is None
    path.write_text("{torn")
    assert evaluate.saved_base(path, fingerprint) is None
