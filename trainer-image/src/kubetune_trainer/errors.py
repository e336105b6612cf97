"""Errors the trainer tells apart: a configuration error is not worth retrying."""

from __future__ import annotations

# Exit code of a ConfigError: kubetune.api.dataplane.CONFIG_ERROR_EXIT_CODE (shared with the
# operator's podFailurePolicy and `kubetune run`).


class ConfigError(Exception):
    """The run config, a dataset or a model source is wrong; retrying cannot help."""


class DatasetError(ConfigError):
    """A dataset record is malformed. The message names the file, the line and the problem."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


class Stopped(Exception):
    """A stop signal arrived and every rank checkpointed at `step` (exit code
    `kubetune.api.dataplane.STOPPED_EXIT_CODE`: retryable, a restart resumes from `step`)."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} at step {step} after writing its checkpoint;"
                         " a restart resumes from it")
        self.step = step
        self.signal_name = signal_name
