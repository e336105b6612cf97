"""Durable, atomic checkpoints and a resume that survives a torn one.

Layout: `<output>/checkpoints/step-00000042/` holding the trainable weights, optimizer,
schedule (`trainer_state.pt`, or DeepSpeed's per-rank shards under `deepspeed/`), every rank's
RNG state (`rng-rank<N>.pt`), `meta.json` (step, epoch, data position, train loss and the size
of every file above) and the marker `COMPLETE`, written last. The data position is the step
index: the record order is a pure function of the seed (`microbatches.py`).

Why each rule:
- Everything is written into `.tmp-step-...` first, every file and directory is fsynced, and
  rank 0 renames it into place once all ranks are done, then fsyncs `checkpoints/`: a crash or
  power loss mid-save leaves a temp directory (removed at the next save) and never a
  `step-...` directory whose files are still in the page cache only.
- On resume the complete checkpoints are tried newest first; one whose files are missing,
  shorter or longer than `meta.json` recorded, or that does not load on some rank is logged,
  moved aside as `.torn-step-...` and the previous one is tried. Everything is read into memory
  before anything is applied, so a checkpoint that fails half-way leaves the model untouched.
  One torn checkpoint therefore costs the steps since the previous one, not every retry.
- Old checkpoints are pruned before a save when keeping them would exceed `checkpoint.keep`,
  so the space a save needs is freed first and a full disk does not fail every retry; the
  newest complete checkpoint is never deleted before the new one is complete (with `keep: 1`
  the disk must hold two). A save that fails (ENOSPC) removes its temp directory and raises
  `CheckpointError`; the complete checkpoints on disk stay, so the retry resumes from one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.train import distributed
from kubetune_trainer.train.distributed import Ranks
from kubetune_trainer.train.stepper import DeepSpeedStepper, Stepper

log = logging.getLogger("kubetune_trainer")

MARKER = "COMPLETE"
META = "meta.json"
PREFIX = "step-"
STAGING = ".tmp-"
TORN = ".torn-"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or one on disk is unusable."""


@dataclass(frozen=True)
class Meta:
    """`meta.json`: where training stands, and what the directory must hold."""

    step: int
    epoch: float
    data_position: int
    train_loss: float | None = None
    files: dict[str, int] | None = None
    """Size in bytes of every state file, by path relative to the checkpoint; None in
    checkpoints written before sizes were recorded (then only loading verifies them)."""

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "epoch": self.epoch,
                           "dataPosition": self.data_position, "trainLoss": self.train_loss,
                           "files": self.files})

    @classmethod
    def from_json(cls, text: str) -> Meta:
        data = json.loads(text)
        files = data.get("files")
        return cls(
            step=int(data["step"]), epoch=float(data["epoch"]),
            data_position=int(data.get("dataPosition", data["step"])),
            train_loss=None if data.get("trainLoss") is None else float(data["trainLoss"]),
            files=None if files is None else {str(k): int(v) for k, v in files.items()},
        )


def directory_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def to_delete(checkpoints: list[Path], keep: int) -> list[Path]:
    """The checkpoints beyond the newest `keep` (after a save)."""
    return checkpoints[: max(0, len(checkpoints) - keep)]


def to_delete_before_save(checkpoints: list[Path], keep: int) -> list[Path]:
    """The checkpoints to delete before writing a new one: those the new one would push past
    `keep`, but never the newest complete one, which is all a retry has if the save fails."""
    return checkpoints[: max(0, len(checkpoints) - max(keep - 1, 1))]


def size_problems(directory: Path, files: dict[str, int]) -> list[str]:
    """What differs between the files in `directory` and the sizes recorded for them."""
    problems = []
    for name, size in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{name} has {actual} bytes, {size} were written")
    return problems


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (DeepSpeed writes its shards itself)."""
    for directory, _, names in os.walk(root):
        for name in names:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def write_state(obj: Any, path: Path) -> None:
    """`torch.save` into `path`, on disk before it returns."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def recorded_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _prepare(root: Path, staging: Path, keep: int) -> None:
    """Rank 0 before a save: clear leftovers, make room, create the temp directory."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(f"{STAGING}*"), *root.glob(f"{TORN}*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for old in to_delete_before_save(complete_checkpoints(root), keep):
        log.info("removing checkpoint %s to make room for the next one (keep: %d)", old, keep)
        shutil.rmtree(old, ignore_errors=True)
    staging.mkdir()


def _publish(root: Path, staging: Path, final: Path, meta: Meta, keep: int) -> None:
    """Rank 0 once every rank wrote its files: meta, marker, rename, prune."""
    fsync_tree(staging)
    write_text(staging / META, replace(meta, files=recorded_sizes(staging)).to_json())
    write_text(staging / MARKER, "ok\n")
    fsync_path(staging)
    if final.exists():  # a torn one at this step, moved aside already unless it had no marker
        shutil.rmtree(final)
    staging.rename(final)
    fsync_path(root)  # the rename itself survives a power loss only once its directory is synced
    for old in to_delete(complete_checkpoints(root), keep):
        shutil.rmtree(old, ignore_errors=True)


def save(root: Path, meta: Meta, stepper: Stepper, ranks: Ranks, keep: int) -> Path:
    """Write a checkpoint atomically and durably (all ranks call this) and prune old ones."""
    final = root / directory_name(meta.step)
    staging = root / f"{STAGING}{final.name}"
    try:
        if ranks.is_main:
            _prepare(root, staging, keep)
        distributed.barrier()
        if isinstance(stepper, DeepSpeedStepper):
            stepper.ds.save_checkpoint(str(staging / "deepspeed"), tag="state", save_latest=False)
        elif ranks.is_main:
            write_state({"model": trainable_state(stepper.model),
                         "optimizer": stepper.optimizer.state_dict(),
                         "scheduler": stepper.scheduler.state_dict()}, staging / TRAINER_STATE)
        write_state(rng_state(), staging / f"rng-rank{ranks.rank}.pt")
        fsync_tree(staging)  # this rank's DeepSpeed shards, from this node
        distributed.barrier()
        if ranks.is_main:
            _publish(root, staging, final, meta, keep)
    except OSError as error:
        # A full disk, a quota, an I/O error: free what the attempt took, so the retry has
        # room, and fail clearly; the complete checkpoints stay where they are.
        if ranks.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        kept = newest(root)
        raise CheckpointError(
            f"cannot write checkpoint {final.name}: {error}; "
            + (f"a restart resumes from {kept.name}" if kept else "no checkpoint is kept yet")
        ) from error
    distributed.barrier()
    return final


@dataclass
class Loaded:
    """A checkpoint read into memory and checked, not applied yet."""

    path: Path
    meta: Meta
    trainer_state: dict[str, Any] | None
    rng: dict[str, Any] | None


def read(path: Path, stepper: Stepper, ranks: Ranks) -> Loaded:
    """Read and check a checkpoint without touching `stepper`; raises when it is unusable."""
    meta = Meta.from_json((path / META).read_text())
    if meta.files is not None and (problems := size_problems(path, meta.files)):
        raise CheckpointError("; ".join(problems))
    state = None
    if not isinstance(stepper, DeepSpeedStepper):
        state = torch.load(path / TRAINER_STATE, weights_only=False)
        missing = set(state["model"]) - {n for n, _ in stepper.model.named_parameters()}
        if missing:
            raise CheckpointError(f"it does not match the model: {sorted(missing)[:3]}")
    rng_path = path / f"rng-rank{ranks.rank}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
    return Loaded(path, meta, state, rng)


def apply(loaded: Loaded, stepper: Stepper) -> None:
    """Restore what `read` returned into `stepper` (all ranks)."""
    if isinstance(stepper, DeepSpeedStepper):
        load_path, _ = stepper.ds.load_checkpoint(str(loaded.path / "deepspeed"), tag="state")
        if load_path is None:  # DeepSpeed only warns when it finds nothing to load
            raise CheckpointError(f"DeepSpeed found no state in {loaded.path / 'deepspeed'}")
    else:
        assert loaded.trainer_state is not None
        params = dict(stepper.model.named_parameters())
        with torch.no_grad():
            for name, value in loaded.trainer_state["model"].items():
                params[name].copy_(value)
        stepper.optimizer.load_state_dict(loaded.trainer_state["optimizer"])
        stepper.scheduler.load_state_dict(loaded.trainer_state["scheduler"])
    if loaded.rng is not None:
        set_rng_state(loaded.rng)


def set_aside(path: Path) -> Path:
    """Move an unusable checkpoint out of the way (`.torn-step-...`, removed at the next save)."""
    target = path.with_name(f"{TORN}{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target


def resume(root: Path, stepper: Stepper, ranks: Ranks, device: torch.device) -> Meta | None:
    """Restore the newest checkpoint that every rank can load (all ranks call this); None when
    there is none, and training starts from step 0."""
    names = [p.name for p in reversed(complete_checkpoints(root))] if ranks.is_main else []
    agreed = distributed.broadcast_text(json.dumps(names), ranks)
    for name in json.loads(agreed or "[]"):
        path = root / name
        problem = ""
        try:
            loaded = read(path, stepper, ranks)
        except Exception as error:  # torn, truncated, unreadable: try the previous one
            problem = f"{type(error).__name__}: {error}"
        if distributed.max_over_ranks(int(bool(problem)), ranks, device):
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path,
                        problem or "it failed to load on another rank")
            if ranks.is_main:
                log.warning("moved %s to %s", path, set_aside(path))
            distributed.barrier()
            continue
        apply(loaded, stepper)
        return loaded.meta
    return None
