"""Stop at a step boundary on SIGTERM or SIGINT, after a checkpoint.

The kubelet sends SIGTERM to a pod it evicts, preempts or drains, then SIGKILL after the grace
period; torchrun (the pods' PID 1) forwards it to every rank; `kubetune run` forwards Ctrl-C
to the trainer's process group as SIGINT, then SIGTERM. While the loop runs, either signal only
records itself here: the step in progress finishes, the loop writes a checkpoint at that step
boundary and raises `errors.Stopped` (exit code `STOPPED_EXIT_CODE`, retryable). A second
signal changes nothing (the checkpoint in progress must finish); SIGKILL remains the hard stop,
and checkpoints are atomic, so even that loses only the steps since the last one.

Ranks can see the signal at different steps (torchrun signals them one by one; the nodes of a
multi-node job are signalled independently), so the loop takes the maximum over all ranks
every step (`distributed.max_over_ranks`) and every rank stops at the same step.

Outside the loop (loading, the base evaluation, saving the outputs) the default handlers stay:
a signal there ends the process at once, and nothing trained is lost, since the last step's
checkpoint is written before the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("kubetune_trainer")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """The first stop signal received (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s received: checkpointing at the end of this step, then stopping",
                        signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Record SIGTERM and SIGINT instead of dying, until the block ends."""
        previous = {signum: signal.signal(signum, self._record) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
