"""The quickstart's data generator: deterministic, disjoint splits, committed files current."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "trainer-image/src/kubetune_trainer/datasets/kubectl-commands"


def _generator() -> ModuleType:
    # examples/ is not a package; load the script as a module by path.
    path = ROOT / "examples/kubectl_dataset.py"
    spec = importlib.util.spec_from_file_location("kubectl_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kubectl_dataset", module)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _read(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    gen.write_splits(tmp_path / "a", seed=3, sizes={"train": 50, "validation": 10, "test": 10})
    gen.write_splits(tmp_path / "b", seed=3, sizes={"train": 50, "validation": 10, "test": 10})
    first, second = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert set(first) == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert first == second


def test_another_seed_gives_other_data() -> None:
    assert gen.generate(1, {"train": 20}) != gen.generate(2, {"train": 20})


def test_splits_are_disjoint_and_sized() -> None:
    splits = gen.generate()
    requests = {name: {r.lower() for r, _ in records} for name, records in splits.items()}
    assert {name: len(records) for name, records in splits.items()} == gen.DEFAULT_SIZES
    assert not requests["train"] & requests["test"]
    assert not requests["train"] & requests["validation"]
    assert not requests["validation"] & requests["test"]
    # Every split covers every kind of request (they rotate).
    verbs = {name: {c.split()[1] for _, c in records} for name, records in splits.items()}
    assert verbs["test"] == verbs["train"] >= {"get", "describe", "delete", "scale", "logs",
                                               "rollout", "port-forward", "create", "label"}


def test_records_are_chat_with_one_command_answer() -> None:
    for line in (COMMITTED / "test.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[2]["content"].startswith("kubectl ")
        assert "\n" not in messages[2]["content"]


def test_committed_splits_match_the_generator(tmp_path: Path) -> None:
    gen.write_splits(tmp_path)
    assert _read(tmp_path) == _read(COMMITTED), (
        "the committed kubectl-commands splits are stale: run python examples/kubectl_dataset.py"
    )
    total = sum(len(data) for data in _read(COMMITTED).values())
    assert total < 1_000_000
