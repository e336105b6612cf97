"""Child processes of `kubetune run`: the same data-plane commands the pods run.

The commands are built by pure functions (tested without running anything). Children run in
their own process group, so a Ctrl-C in the terminal reaches only `kubetune run`, which
forwards it to the child and waits: the trainer stops after writing its checkpoint atomically,
torchrun passes the signal on to its ranks, and nothing is killed half-way through a write.
Each further Ctrl-C sends the next, harder signal (SIGTERM, then SIGKILL), also while
`Child.stop` waits, which never returns before the child has ended: a child left running would
go on writing the run directory with no terminal to stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from kubetune.api import PlanStatus


def train_command(config: Path, output: Path, plan: PlanStatus) -> list[str]:
    """`python -m kubetune_trainer train ...`, under torchrun when the plan has several ranks.

    Locally every rank runs on this machine: `nodes x gpusPerNode` GPU processes, or `nodes`
    CPU processes when `gpusPerNode` is 0 (the planner's world size covers both).
    """
    trainer = ["-m", "kubetune_trainer", "train", "--config", str(config), "--output", str(output)]
    if plan.world_size <= 1:
        return [sys.executable, *trainer]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(plan.world_size),
        *trainer,
    ]


def export_command(
    source: Path | str, output: Path, precision: str, device: str, quantization: str | None = None
) -> list[str]:
    """Export a run directory, a model directory or a model source (`builtin://NAME`) to a
    verified ONNX model."""
    return [
        sys.executable, "-m", "kubetune_trainer", "export",
        "--input", str(source), "--output", str(output),
        "--precision", precision, "--device", device,
        *([] if quantization is None else ["--quantization", quantization]),
    ]  # fmt: skip


SERVE_ENGINE = "batch"
"""The server's engine in local mode: continuous batching on ONNX Runtime (its default)."""


def serve_command(model_dir: Path, host: str, port: int, name: str) -> list[str]:
    return [
        sys.executable, "-m", "kubetune_trainer", "serve",
        "--model", str(model_dir), "--host", host, "--port", str(port),
        "--served-model-name", name, "--engine", SERVE_ENGINE,
    ]


def _default_sigint() -> None:
    """In the child before exec: a shell starts background jobs with SIGINT ignored, and a
    Python child would inherit that and never see the Ctrl-C we forward."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Interrupted(Exception):
    """The user pressed Ctrl-C; the child has stopped."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
"""What stops a child, politest first: the trainer checkpoints on SIGINT or SIGTERM."""
POLL_SECONDS = 0.1
"""How often `Child.stop` looks whether a Ctrl-C asked it to hurry."""


@contextlib.contextmanager
def _signals_call(handler: Callable[[], None], signums: tuple[int, ...]) -> Iterator[None]:
    """While the block runs, `signums` call `handler` instead of what they did before.

    Signal handlers can only be set from the main thread; elsewhere (a test's helper thread)
    the handlers stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def call(signum: int, frame: FrameType | None) -> None:
        handler()

    previous = {signum: signal.signal(signum, call) for signum in signums}
    try:
        yield
    finally:
        for signum, restored in previous.items():
            signal.signal(signum, restored)


class Child:
    """A data-plane process whose output goes to a log file, stopped politely on Ctrl-C."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # the terminal's Ctrl-C reaches us, not the child directly
            preexec_fn=_default_sigint,
        )
        self.stop_signals_sent = 0

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(self.process.pid, signum)

    def escalate(self) -> None:
        """Send the next of `STOP_SIGNALS` (SIGKILL again once all were sent)."""
        signum = STOP_SIGNALS[min(self.stop_signals_sent, len(STOP_SIGNALS) - 1)]
        self.stop_signals_sent += 1
        self.signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """End the child: SIGINT, then SIGTERM, then SIGKILL, each after `timeout` s in which
        it did not end (a signal `run_child` already forwarded counts as sent).

        A Ctrl-C (or SIGTERM) while this waits sends the next signal at once and waits on: the
        child runs in a session of its own, so raising KeyboardInterrupt out of the wait, as
        Python's default handler would, leaves it running and writing the run directory."""
        with _signals_call(self.escalate, (signal.SIGINT, signal.SIGTERM)):
            if self.stop_signals_sent == 0:
                self.escalate()
            sent, deadline = self.stop_signals_sent, time.monotonic() + timeout
            while True:
                try:
                    return self.wait(POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                if self.stop_signals_sent == sent and time.monotonic() >= deadline:
                    self.escalate()
                if self.stop_signals_sent != sent:  # a Ctrl-C, or the deadline
                    sent, deadline = self.stop_signals_sent, time.monotonic() + timeout

    def wait(self, timeout: float | None) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def run_child(
    child: Child, on_tick: Callable[[], None] | None = None, tick_seconds: float = 0.5
) -> int:
    """Wait for `child`, calling `on_tick` periodically (progress). Ctrl-C is forwarded.

    The first Ctrl-C sends SIGINT to the child and keeps waiting; a second one sends SIGTERM;
    a third kills it. Raises Interrupted once the child has ended after an interrupt. Left
    early by an exception (SIGTERM, an error), it stops the child before returning.
    """
    interrupted = False

    def forward() -> None:
        nonlocal interrupted
        interrupted = True
        child.escalate()

    try:
        with _signals_call(forward, (signal.SIGINT,)):
            while True:
                try:
                    code = child.process.wait(tick_seconds)
                    break
                except subprocess.TimeoutExpired:
                    if on_tick:
                        on_tick()
            if on_tick:
                on_tick()
    finally:
        if child.process.poll() is None:  # left early by an exception (SIGTERM, an error)
            child.stop()
        if not child._log.closed:
            child._log.close()
    if interrupted:
        raise Interrupted(f"interrupted; the child exited with code {code}")
    return code


def terminate_like_ctrl_c() -> None:
    """Treat SIGTERM (`timeout`, a CI runner, `kill`) as Ctrl-C, so children are stopped too:
    they run in sessions of their own and would outlive us otherwise."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             alive: Callable[[], bool] | None = None) -> None:
    """Poll `condition` until it holds; fail early when `alive` says the process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.2)
