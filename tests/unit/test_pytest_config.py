"""The test run's own settings that keep `make test` within the machine it runs on."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_passing_tests_temporary_directory_is_removed_when_it_ends() -> None:
    # pytest keeps every test's tmp_path by default; a CI run kept 22 GB there (trained
    # models, ONNX exports, the real node's volumes) and filled the disk in the trainer tier.
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert settings["ini_options"]["tmp_path_retention_policy"] == "failed"


def test_make_tests_lanes_run_every_tier() -> None:
    # make test runs pytest in two lanes (hack/test-lanes.sh), each naming its tiers: a tier
    # added under tests/ and named in neither would never run in CI.
    lanes = (ROOT / "hack" / "test-lanes.sh").read_text()
    named = {word.removeprefix("tests/") for line in lanes.splitlines() if "-m pytest" in line
             for word in line.split() if word.startswith("tests/")}
    tiers = {path.relative_to(ROOT / "tests").parts[0]
             for path in (ROOT / "tests").rglob("test_*.py")}
    assert named == tiers
