"""Errors the trainer tells apart: a configuration error is not worth retrying."""

from __future__ import annotations

from kubetune.api.dataplane import JsonlError

# Exit code of a ConfigError: kubetune.api.dataplane.CONFIG_ERROR_EXIT_CODE (shared with the
# operator's podFailurePolicy and `kubetune run`).


class ConfigError(Exception):
    """The run config, a dataset or a model source is wrong; retrying cannot help."""


class DatasetError(ConfigError, JsonlError):
    """A dataset record is malformed: `file:line: problem`, as `JsonlError` (the line reader's
    error, whose message and fields it shares) words it, and not worth retrying."""


class Stopped(Exception):
    """A stop signal arrived and every rank checkpointed at `step` (exit code
    `kubetune.api.dataplane.STOPPED_EXIT_CODE`: retryable, a restart resumes from `step`)."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} at step {step} after writing its checkpoint;"
                         " a restart resumes from it")
        self.step = step
        self.signal_name = signal_name
