"""The trainer checks at start that the plan was made for the model it loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import RunConfig
from kubetune_trainer.sources import ModelLocation
from kubetune_trainer.train import plancheck
from tests.trainer.conftest import run_config, start_training, write_tiny_dataset

# Phi-3-mini-4k-instruct's size keys: 3.82B parameters, hidden 3072, 32 layers.
PHI3 = {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32064, "tie_word_embeddings": False}


def model_dir(root: Path, config: dict[str, Any] | str = PHI3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return root


def run_with_plan(tmp_path: Path, source: str, **plan: Any) -> dict[str, Any]:
    train, validation = write_tiny_dataset(tmp_path / "data")
    config = run_config(train, validation)
    config["spec"]["model"]["source"] = source
    config["plan"].update(plan)
    return config


def test_a_plan_for_another_model_is_reported_field_by_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = model_dir(tmp_path / "phi3")
    guessed = RunConfig.model_validate(run_with_plan(
        tmp_path, f"file://{directory}", parameters=7_000_000_000, hiddenSize=4096, layers=32))
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer"):
        found = plancheck.check(guessed, ModelLocation(str(directory)))
    assert found is not None
    assert "parameters 7.00B planned, 3.82B in config.json" in found
    assert "hiddenSize 4096 planned, 3072 in config.json" in found
    assert found in caplog.text

    right = RunConfig.model_validate(run_with_plan(
        tmp_path, f"file://{directory}", parameters=3_821_079_552, hiddenSize=3072, layers=32))
    assert plancheck.check(right, ModelLocation(str(directory))) is None


def test_a_config_it_cannot_read_is_skipped(tmp_path: Path) -> None:
    run = RunConfig.model_validate(run_with_plan(tmp_path, "file:///x", parameters=7_000_000))
    broken = model_dir(tmp_path / "broken", "{")
    assert plancheck.check(run, ModelLocation(str(broken))) is None
    moe = model_dir(tmp_path / "moe", {**PHI3, "model_type": "mixtral", "num_local_experts": 8})
    assert plancheck.check(run, ModelLocation(str(moe))) is None


def test_the_report_and_termination_message_carry_it(tmp_path: Path) -> None:
    """A model directory with config.json only: the check runs at start, before the loading
    that then fails; the failed run's report still says the plan was for another model."""
    directory = model_dir(tmp_path / "phi3-dir")
    config = run_with_plan(tmp_path, f"file://{directory}", parameters=7_000_000_000,
                           hiddenSize=4096, layers=32)
    result = start_training(config, tmp_path / "out", timeout=300)
    assert result.returncode != 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "hiddenSize 4096 planned, 3072 in config.json" in report["planMismatch"]
    short = json.loads((tmp_path / "termination-log").read_text())
    assert short["planMismatch"] == report["planMismatch"]
