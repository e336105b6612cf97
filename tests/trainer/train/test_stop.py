"""SIGTERM and SIGINT stop the trainer at a step boundary, after a checkpoint (issue 13,
finding 14).

Real training processes with a schedule far longer than the test (1000 steps): the test waits
for logged steps, signals, and checks the exit code, the checkpoint at the step the trainer
stopped at, and that the next run resumes exactly there. SIGTERM is what the kubelet sends a
pod (torchrun forwards it to the ranks); SIGINT is what `kubetune run` forwards on Ctrl-C,
through the same `Child` it uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import PlanStatus
from kubetune.api.dataplane import CONFIG_ERROR_EXIT_CODE, STOPPED_EXIT_CODE
from kubetune.local.processes import Child, train_command
from kubetune_trainer.train import checkpoint
from tests.trainer.conftest import REPO, report, run_config, trainer_env, write_tiny_dataset


def logged_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(int(json.loads(line)["step"]))
    return steps


def wait_until(condition: Callable[[], bool], alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 600
    while not condition():
        assert alive(), f"the trainer exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def long_run(tmp_path: Path, **shape: Any) -> tuple[dict[str, Any], Path, Path]:
    train, _ = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, None, steps=1000, epochs=1000, **shape)
    config["spec"]["checkpoint"] = {"everySteps": 1000, "keep": 2}
    output = tmp_path / "out"
    output.mkdir()
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config))
    return config, config_path, output


def stopped_at(output: Path, signal_name: str) -> int:
    """The step a stopped run reports; its checkpoint must be the newest and complete."""
    final = report(output)
    assert final["status"] == "Failed" and signal_name in final["error"], final
    step = int(final["steps"])
    newest = checkpoint.newest(output / "checkpoints")
    assert newest == output / "checkpoints" / checkpoint.directory_name(step)
    meta = checkpoint.Meta.from_json((newest / "meta.json").read_text())
    assert meta.step == step and meta.files is not None
    assert checkpoint.size_problems(newest, meta.files) == []
    assert logged_steps(output)[-1] == step  # it stopped at the boundary after that step
    return step


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_retryable(
        tmp_path: Path, builtin_model: Path) -> None:
    config, config_path, output = long_run(tmp_path)
    command = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(config_path),
               "--output", str(output)]
    with open(tmp_path / "train.log", "w") as log:
        process = subprocess.Popen(command, env=trainer_env(tmp_path), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: len(logged_steps(output)) >= 2,
                       lambda: process.poll() is None, "two logged steps")
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    text = (tmp_path / "train.log").read_text()
    assert code == STOPPED_EXIT_CODE != CONFIG_ERROR_EXIT_CODE, text[-3000:]
    first = stopped_at(output, "SIGTERM")
    assert 2 <= first < 1000

    # `kubetune run`: Ctrl-C reaches the trainer as SIGINT from `Child`; same stop, and the
    # run resumes exactly where the first one stopped.
    child = Child(train_command(config_path, output, PlanStatus.model_validate(config["plan"])),
                  tmp_path / "run.log", env=trainer_env(tmp_path))
    try:
        wait_until(lambda: logged_steps(output)[-1] > first,
                   lambda: child.process.poll() is None, "a step of the resumed run")
    finally:
        code = child.stop(timeout=600)  # SIGINT, then SIGTERM, then SIGKILL
    assert code == STOPPED_EXIT_CODE, child.log_tail(40)
    second = stopped_at(output, "SIGINT")
    assert report(output)["resumedFromStep"] == first
    steps = logged_steps(output)
    assert steps[steps.index(first) + 1] == first + 1  # no step lost, none repeated
    assert second > first


def workers(torchrun: int) -> dict[int, int]:
    """torchrun's worker processes by rank."""
    children = Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


@pytest.mark.slow
def test_ranks_agree_on_the_stop_step_under_torchrun_and_deepspeed(
        tmp_path: Path, builtin_model: Path) -> None:
    """One rank gets SIGTERM (nodes of a job are signalled independently): every rank stops
    at the same step with one complete DeepSpeed checkpoint. Then SIGTERM to torchrun itself,
    as the kubelet sends it to the pod: torchrun forwards it and the run resumes and stops the
    same way."""
    config, config_path, output = long_run(tmp_path, world=2, zero=2)
    command = train_command(config_path, output, PlanStatus.model_validate(config["plan"]))
    # torchrun SIGKILLs its workers 30 s after forwarding a signal (in a pod the grace period
    # bounds it too); two ranks sharing this CPU with other tests can need longer per step.
    env = trainer_env(tmp_path, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")

    def run(stop: Callable[[subprocess.Popen[bytes]], None], after: int, name: str) -> int:
        with open(tmp_path / name, "w") as log:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: (logged_steps(output) or [0])[-1] >= after,
                           lambda: process.poll() is None, f"step {after}")
                stop(process)
                return process.wait(timeout=600)
            finally:
                if process.poll() is None:
                    process.kill()

    def signal_rank_1(process: subprocess.Popen[bytes]) -> None:
        os.kill(workers(process.pid)[1], signal.SIGTERM)

    code = run(signal_rank_1, 1, "first.log")
    text = (tmp_path / "first.log").read_text()
    # torchrun ends with 1 when its workers fail, any way: retryable, never the config code.
    assert code not in (0, CONFIG_ERROR_EXIT_CODE), text[-3000:]
    first = stopped_at(output, "SIGTERM")  # rank 0 learned of rank 1's signal
    newest = output / "checkpoints" / checkpoint.directory_name(first)
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in newest.iterdir()}
    assert any((newest / "deepspeed").rglob("*optim_states.pt"))

    code = run(lambda process: process.send_signal(signal.SIGTERM), first + 1, "second.log")
    assert code not in (0, CONFIG_ERROR_EXIT_CODE), (tmp_path / "second.log").read_text()[-3000:]
    second = stopped_at(output, "SIGTERM")
    assert report(output)["resumedFromStep"] == first and second > first
    steps = logged_steps(output)
    assert steps[steps.index(first) + 1] == first + 1
