"""The scenarios' built-in datasets (examples/task_datasets.py): deterministic, disjoint splits,
answers decidable from the text, committed files current, each one resolvable and admitted as
`builtin://NAME`."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kubetune.api.spec import BUILTIN_DATASETS, FineTuneJobSpec
from kubetune_trainer import sources

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "trainer-image/src/kubetune_trainer/datasets"


def _generator() -> ModuleType:
    # examples/ is not a package; load the script as a module by path.
    path = ROOT / "examples/task_datasets.py"
    spec = importlib.util.spec_from_file_location("task_datasets", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("task_datasets", module)
    spec.loader.exec_module(module)
    return module


gen = _generator()
NAMES = list(gen.DATASETS)
SMALL = {"train": 60, "validation": 10, "test": 20}


def _read(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_writes_the_same_bytes_and_another_seed_other_data(
    name: str, tmp_path: Path
) -> None:
    gen.write_splits(name, tmp_path / "a", seed=3, sizes=SMALL)
    gen.write_splits(name, tmp_path / "b", seed=3, sizes=SMALL)
    first, second = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert set(first) == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert first == second
    assert gen.generate(name, 1, {"train": 20}) != gen.generate(name, 2, {"train": 20})


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_sized_and_never_share_a_request(name: str) -> None:
    splits = gen.generate(name)
    assert {split: len(records) for split, records in splits.items()} == gen.DEFAULT_SIZES
    requests = {split: {r.lower() for r, _ in records} for split, records in splits.items()}
    assert all(len(requests[split]) == len(splits[split]) for split in splits)
    assert not requests["train"] & requests["validation"]
    assert not requests["train"] & requests["test"]
    assert not requests["validation"] & requests["test"]


def test_every_split_holds_every_queue_in_equal_shares() -> None:
    for split, records in gen.generate("support-tickets").items():
        counts = {queue: sum(answer == queue for _, answer in records) for queue in gen.QUEUES}
        assert set(counts) == set(gen.QUEUES) and sum(counts.values()) == len(records)
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_a_ticket_is_not_decided_by_its_opening_or_closing() -> None:
    # The shared sentences (greeting, context, urgency, sign-off) appear under every queue:
    # stripping the issue leaves nothing that predicts the label.
    records = gen.generate("support-tickets")["train"]
    for context in ("I love your products and my last order was perfect.",
                    "My account details are all up to date."):
        queues = {answer for request, answer in records if context in request}
        assert len(queues) >= 6, (context, queues)


def _written_dates(iso: str) -> list[str]:
    """Ways a text may write the date `iso` with its year, month and day."""
    year, month, day = (int(part) for part in iso.split("-"))
    name = gen.MONTHS[month - 1]
    nth = f"{day}{'th' if 11 <= day <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"
    return [iso, f"{name} {day}, {year}", f"{day} {name} {year}", f"{name[:3]} {nth} {year}",
            f"{nth} of {name} {year}"]


def test_contacts_are_decidable_from_the_text() -> None:
    for split, records in gen.generate("contact-extraction").items():
        fields_seen: set[str] = set()
        for text, answer in records:
            contact = json.loads(answer)
            assert answer == json.dumps(contact, separators=(",", ":"))  # compact
            keys = list(contact)
            assert keys == [key for key in gen.CONTACT_FIELDS if key in contact]  # fixed order
            assert "name" in contact
            fields_seen |= set(keys)
            for key, value in contact.items():
                if key != "date":
                    assert value in text, (split, key, value, text)
            if "date" in contact:
                assert any(form in text for form in _written_dates(contact["date"])), text
        assert fields_seen == set(gen.CONTACT_FIELDS), split


def test_qa_answers_are_spans_of_their_context_among_distractors() -> None:
    for split, records in gen.generate("short-qa").items():
        for request, answer in records:
            context, question = request.split("\nQuestion: ")
            assert context.startswith("Context: ") and question.endswith("?")
            assert answer in context, (split, answer, request)
            assert answer not in question
        # The question decides between facts of one type: a year's question always has
        # another year in its context.
        for request, answer in records:
            if re.fullmatch(r"\d{4}", answer):
                years = set(re.findall(r"\b\d{4}\b", request.split("\nQuestion: ")[0]))
                assert len(years) >= 2 and answer in years, request


@pytest.mark.parametrize("name", NAMES)
def test_committed_splits_match_the_generator(name: str, tmp_path: Path) -> None:
    gen.write_splits(name, tmp_path)
    assert _read(tmp_path) == _read(SHIPPED / name), (
        f"the committed {name} splits are stale: run python examples/task_datasets.py {name}"
    )
    assert sum(len(data) for data in _read(SHIPPED / name).values()) < 1_000_000
    first = json.loads((SHIPPED / name / "test.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]


def test_every_builtin_dataset_is_shipped_resolved_and_admitted() -> None:
    assert set(BUILTIN_DATASETS) == {path.name for path in SHIPPED.iterdir() if path.is_dir()}
    for name in BUILTIN_DATASETS:
        uri = f"builtin://{name}"
        assert sources.resolve_dataset(uri) == SHIPPED / name / "train.jsonl"
        assert sources.builtin_split(uri, "validation") == SHIPPED / name / "validation.jsonl"
        assert sources.builtin_split(uri, "test") == SHIPPED / name / "test.jsonl"
        spec = FineTuneJobSpec.model_validate(
            {"model": {"source": "builtin://smollm2-135m-instruct"}, "dataset": {"source": uri}}
        )
        assert spec.dataset.source == uri


def words(text: str) -> set[str]:
    return set(text.lower().rstrip(".").split())


def test_every_veltish_word_of_a_held_out_sentence_is_learnable_from_training() -> None:
    splits = gen.generate("english-to-veltish")
    trained = set().union(*(words(answer) for _, answer in splits["train"]))
    for split in ("validation", "test"):
        for english, veltish in splits[split]:
            assert words(veltish) <= trained, (split, english, veltish, words(veltish) - trained)
    for english, veltish in splits["test"]:
        # The tense is the verb's ending, and the verb comes last (subject-object-verb).
        ending = veltish.rstrip(".").split()[-1][-2:]
        if " will " in english:
            assert ending == "os", (english, veltish)
        else:
            assert ending in ("as", "is"), (english, veltish)
