"""Atomic checkpoints and resume.

Layout: `<output>/checkpoints/step-00000042/` holding the trainable weights, optimizer,
schedule (`trainer_state.pt`, or DeepSpeed's per-rank shards under `deepspeed/`), every rank's
RNG state (`rng-rank<N>.pt`), `meta.json` (step, epoch, data position) and the marker
`COMPLETE`, written last. Everything is written into `.tmp-step-...` first and renamed into
place by rank 0 once all ranks are done, so a crash mid-write leaves only a temp directory
(removed at the next save) and the newest complete checkpoint stays intact. The data position
is the step index: the record order is a pure function of the seed (`batching.py`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.train import distributed
from kubetune_trainer.train.distributed import Ranks
from kubetune_trainer.train.stepper import DeepSpeedStepper, Stepper

MARKER = "COMPLETE"
PREFIX = "step-"


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
    """The checkpoints beyond the newest `keep`."""
    return checkpoints[: max(0, len(checkpoints) - keep)]


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


def save(root: Path, step: int, meta: dict[str, Any],
         stepper: Stepper, ranks: Ranks, keep: int) -> Path:
    """Write a checkpoint atomically (all ranks call this) and prune old ones."""
    final = root / directory_name(step)
    staging = root / f".tmp-{directory_name(step)}"
    if ranks.is_main:
        for stale in root.glob(".tmp-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    if isinstance(stepper, DeepSpeedStepper):
        stepper.ds.save_checkpoint(str(staging / "deepspeed"), tag="state", save_latest=False)
    elif ranks.is_main:
        torch.save(
            {"model": trainable_state(stepper.model), "optimizer": stepper.optimizer.state_dict(),
             "scheduler": stepper.scheduler.state_dict()},
            staging / "trainer_state.pt",
        )
    torch.save(rng_state(), staging / f"rng-rank{ranks.rank}.pt")
    distributed.barrier()
    if ranks.is_main:
        (staging / "meta.json").write_text(json.dumps(meta))
        with open(staging / MARKER, "w") as marker:
            marker.write("ok\n")
            marker.flush()
            os.fsync(marker.fileno())
        staging.rename(final)
        for old in to_delete(complete_checkpoints(root), keep):
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, stepper: Stepper, ranks: Ranks) -> dict[str, Any]:
    """Restore a checkpoint into `stepper` (all ranks) and return its meta."""
    if isinstance(stepper, DeepSpeedStepper):
        stepper.ds.load_checkpoint(str(path / "deepspeed"), tag="state")
    else:
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        missing = set(state["model"]) - {n for n, _ in stepper.model.named_parameters()}
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match the model: {sorted(missing)[:3]}")
        params = dict(stepper.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        stepper.optimizer.load_state_dict(state["optimizer"])
        stepper.scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{ranks.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return dict(json.loads((path / "meta.json").read_text()))
