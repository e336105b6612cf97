"""Fixtures of the family matrix: each family's tiny model, built once per test process."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.trainer.families.catalog import FAMILIES, Family, build_tiny_model

SCRATCH = Path(tempfile.mkdtemp(prefix="kubetune-families-"))
atexit.register(shutil.rmtree, SCRATCH, True)


@functools.cache
def tiny_model(name: str) -> Path:
    """The family's random-weight model with its real tokenizer (built once per process)."""
    return build_tiny_model(FAMILIES[name], SCRATCH / "models" / name)


@pytest.fixture(params=sorted(FAMILIES), ids=str)
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="session", autouse=True)
def family_exports_ahead(request: pytest.FixtureRequest) -> None:
    """The exports the selected family tests read, queued before the first of them runs."""
    from tests.trainer.families.exports import queue_ahead

    queue_ahead(request.session.items)
