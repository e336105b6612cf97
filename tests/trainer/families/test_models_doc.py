"""docs/models.md is current, has no empty cell, and every cell names a collected test."""

from __future__ import annotations

import subprocess
import sys

from tests.trainer.conftest import REPO
from tests.trainer.families.models_doc import nodes, render


def test_models_doc_is_generated_and_current() -> None:
    assert (REPO / "docs" / "models.md").read_text() == render(), (
        "docs/models.md is stale: python -m tests.trainer.families.models_doc > docs/models.md")


def test_every_cell_names_a_test_pytest_collects() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/trainer/families"], cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False)
    collected = set(result.stdout.split())
    missing = [node for node in nodes() if node not in collected]
    assert not missing, missing
