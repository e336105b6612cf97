"""Checkpoints are durable and a retry always finds one it can load (issue 13, finding 15).

In-process, with a two-layer model on a `TorchStepper`: the same `checkpoint.save` and
`checkpoint.resume` the trainer calls, a few kilobytes per checkpoint. The runs that train the
built-in model end to end are in test_resume.py.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.spec import TrainingSpec
from kubetune_trainer.train import checkpoint
from kubetune_trainer.train.distributed import Ranks
from kubetune_trainer.train.report import MetricsLog
from kubetune_trainer.train.stepper import TorchStepper

ONE = Ranks(rank=0, world=1, local_rank=0)
CPU = torch.device("cpu")


def stepper() -> TorchStepper:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    return TorchStepper(model, TrainingSpec(), total_steps=100, device=CPU)


def train_step(s: TorchStepper) -> None:
    s.backward(s.model(torch.randn(4, 8)).pow(2).sum())
    s.step()


def weights(s: TorchStepper) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.model.named_parameters()}


def save(root: Path, s: TorchStepper, step: int, keep: int = 3) -> Path:
    meta = checkpoint.Meta(step=step, epoch=step / 10, data_position=step, train_loss=1.0 / step)
    return checkpoint.save(root, meta, s, ONE, keep)


def trained(root: Path, steps: int, keep: int = 3) -> tuple[TorchStepper,
                                                            dict[int, dict[str, torch.Tensor]]]:
    """Train `steps` steps, checkpointing each; the weights after each step."""
    s, after = stepper(), {}
    for step in range(1, steps + 1):
        train_step(s)
        save(root, s, step, keep)
        after[step] = weights(s)
    return s, after


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_fsyncs_every_file_the_directory_and_its_parent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose data is still in the page cache when the node loses power comes back
    torn; only `COMPLETE` was fsynced before."""
    root = tmp_path / "checkpoints"
    s = stepper()
    train_step(s)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = save(root, s, 1)
    staging = root / f".tmp-{final.name}"  # where the files were while they were written
    files = [p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    assert {"trainer_state.pt", "rng-rank0.pt", "meta.json", "COMPLETE"} <= {str(f) for f in files}
    unsynced = {str(staging / f) for f in files} - set(synced)
    assert not unsynced, f"written but never fsynced: {sorted(unsynced)}"
    assert str(staging) in synced, "the checkpoint directory is not fsynced"
    # The parent holds the rename: synced after it, or the rename can be lost.
    assert str(root) in synced[synced.index(str(staging / "COMPLETE")):]


def test_meta_records_the_size_of_every_file(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    s = stepper()
    train_step(s)
    final = save(root, s, 1)
    meta = checkpoint.Meta.from_json((final / "meta.json").read_text())
    assert meta.step == 1 and meta.train_loss == 1.0
    assert meta.files == {"trainer_state.pt": (final / "trainer_state.pt").stat().st_size,
                          "rng-rank0.pt": (final / "rng-rank0.pt").stat().st_size}
    assert checkpoint.size_problems(final, meta.files) == []


def test_resume_skips_a_truncated_checkpoint_for_the_previous_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    _, after = trained(root, 3)
    state = root / "step-00000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # torn mid-file

    fresh = stepper()
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer"):
        meta = checkpoint.resume(root, fresh, ONE, CPU)
    assert meta is not None and meta.step == 2
    assert same(weights(fresh), after[2])
    assert "step-00000003 is unusable" in caplog.text and "trainer_state.pt has" in caplog.text
    # Set aside, so the next retry does not trip over it, and removed by the next save.
    assert names(root) == [".torn-step-00000003", "step-00000001", "step-00000002"]
    train_step(fresh)
    save(root, fresh, 3)
    assert names(root) == ["step-00000001", "step-00000002", "step-00000003"]


def test_resume_skips_a_checkpoint_that_does_not_load_and_never_half_applies_it(
        tmp_path: Path) -> None:
    """Same size as recorded but garbage inside (or written before sizes were recorded): the
    load fails after nothing was applied, and the previous checkpoint is used."""
    root = tmp_path / "checkpoints"
    _, after = trained(root, 2)
    state = root / "step-00000002" / "trainer_state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    fresh = stepper()
    meta = checkpoint.resume(root, fresh, ONE, CPU)
    assert meta is not None and meta.step == 1 and same(weights(fresh), after[1])


def test_resume_with_every_checkpoint_torn_starts_over_untouched(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    trained(root, 1)
    (root / "step-00000001" / "rng-rank0.pt").unlink()
    fresh = stepper()
    untouched = weights(fresh)
    assert checkpoint.resume(root, fresh, ONE, CPU) is None
    assert same(weights(fresh), untouched)


class Crash(BaseException):
    """The process dies here: nothing after it runs (no except, no cleanup)."""


def partial_then(error: Callable[[], BaseException]) -> Callable[[Any, Path], None]:
    """A `write_state` that writes half a file and then fails with `error()`."""
    real = checkpoint.write_state

    def write(obj: Any, path: Path) -> None:
        real(obj, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise error()

    return write


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_newest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    s, after = trained(root, 2)
    train_step(s)
    monkeypatch.setattr(checkpoint, "write_state", partial_then(Crash))
    with pytest.raises(Crash):
        save(root, s, 3)
    monkeypatch.undo()
    assert ".tmp-step-00000003" in names(root)  # the torn write, never renamed into place

    fresh = stepper()
    meta = checkpoint.resume(root, fresh, ONE, CPU)
    assert meta is not None and meta.step == 2 and same(weights(fresh), after[2])
    train_step(fresh)
    save(root, fresh, 3)
    assert names(root) == ["step-00000001", "step-00000002", "step-00000003"]


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_fails_the_save_clearly_and_keeps_a_checkpoint_to_resume_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    s, after = trained(root, 2, keep=2)
    train_step(s)
    monkeypatch.setattr(checkpoint, "write_state", partial_then(enospc))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"step-00000003.*No space left.*resumes from step-00000002"):
        save(root, s, 3, keep=2)
    monkeypatch.undo()
    # Step 1 went first, to make room; the failed attempt freed what it took.
    assert names(root) == ["step-00000002"]
    fresh = stepper()
    meta = checkpoint.resume(root, fresh, ONE, CPU)
    assert meta is not None and meta.step == 2 and same(weights(fresh), after[2])


def test_pruning_first_makes_room_on_a_disk_that_holds_only_keep_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk with room for `keep` checkpoints and a little more: pruning only after a save
    needed room for keep + 1 and failed every save (and every retry) from then on."""
    root = tmp_path / "checkpoints"
    s = stepper()
    train_step(s)
    size = sum(p.stat().st_size for p in save(root, s, 1, keep=2).rglob("*") if p.is_file())
    capacity = int(2.5 * size)
    real = checkpoint.write_state

    def on_small_disk(obj: Any, path: Path) -> None:
        real(obj, path)
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if used > capacity:
            path.write_bytes(b"")
            raise enospc()

    monkeypatch.setattr(checkpoint, "write_state", on_small_disk)
    for step in range(2, 6):
        train_step(s)
        save(root, s, step, keep=2)
    assert names(root) == ["step-00000004", "step-00000005"]


@pytest.mark.parametrize(("keep", "removed_before", "kept_after"), [
    (1, [1, 2, 3], ["new"]),  # step 4 stays until the new one is complete
    (2, [1, 2, 3], [4, "new"]),
    (3, [1, 2], [3, 4, "new"]),
])
def test_pruning_never_deletes_the_newest_complete_checkpoint_before_a_save(
        tmp_path: Path, keep: int, removed_before: list[int], kept_after: list[Any]) -> None:
    found = [tmp_path / checkpoint.directory_name(step) for step in range(1, 5)]
    new = tmp_path / "new"
    path: dict[int | str, Path] = {step: found[step - 1] for step in range(1, 5)}
    path["new"] = new
    before = checkpoint.to_delete_before_save(found, keep)
    assert before == [path[step] for step in removed_before]
    on_disk = [p for p in found if p not in before] + [new]
    after = checkpoint.to_delete(on_disk, keep)
    assert [p for p in on_disk if p not in after] == [path[step] for step in kept_after]
    assert checkpoint.to_delete_before_save(found[:1], keep) == []


def test_a_failed_metrics_append_is_logged_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.mkdir()  # every append now fails with an OSError (IsADirectoryError)
    log = MetricsLog(path)
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer"):
        log.write({"step": 1})
        log.write({"step": 2})
    assert caplog.text.count("cannot append to") == 1
    path.rmdir()
    log.write({"step": 3})
    assert path.read_text() == '{"step": 3}\n'
