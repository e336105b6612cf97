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
