"""Reading `run.json`: every error names the file and, where it can, the line or the field."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from kubetune.api import RunConfig
from kubetune_trainer.errors import ConfigError


def describe(error: ValidationError) -> str:
    """One line per problem: `spec.training.learningRate: <message>`."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(document)"
        lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)


def load(path: Path) -> RunConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the run config: {error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}"
        ) from error
    try:
        return RunConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{path}: invalid run config: {describe(error)}") from error
