"""Dataset checks: every malformed line kind is reported with file and line, before a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.errors import DatasetError
from kubetune_trainer.train.data import detect_format, load_examples, split_validation

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]})

BAD_CHAT_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"messages": "hello"}), '"messages" must be a list'),
    (json.dumps({"messages": []}), '"messages" is empty'),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), 'needs a string "content"'),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant message"),
    (json.dumps({"messages": ["hi"]}), "messages[0] must be an object"),
    (json.dumps({"prompt": "p", "completion": "c"}), 'missing key "messages"'),
]


@pytest.mark.parametrize(("line", "problem"), BAD_CHAT_LINES)
def test_malformed_chat_line_names_file_line_and_problem(tmp_path: Path, line: str,
                                                         problem: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n")
    with pytest.raises(DatasetError) as caught:
        load_examples(path, "Auto")
    assert caught.value.line == 4  # the blank line 2 is counted, not a record
    assert str(caught.value).startswith(f"{path}:4: ")
    assert problem in str(caught.value)


@pytest.mark.parametrize(("fmt", "record", "problem"), [
    ("Instruction", {"instruction": "do", "output": 5}, '"output" must be a string'),
    ("Instruction", {"input": "x", "output": "y"}, 'missing key "instruction"'),
    ("Instruction", {"instruction": " ", "output": "y"}, '"instruction" is empty'),
    ("Completion", {"prompt": "p"}, 'missing key "completion"'),
    ("Completion", {"prompt": "p", "completion": ""}, '"completion" is empty'),
    ("Text", {"text": ["a"]}, '"text" must be a string'),
])
def test_malformed_records_of_other_formats(tmp_path: Path, fmt: str, record: dict[str, object],
                                            problem: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=rf"data.jsonl:1: .*{problem}"):
        load_examples(path, fmt)


def test_empty_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: contains no records"):
        load_examples(path)


def test_formats_detected_and_normalised(tmp_path: Path) -> None:
    assert detect_format({"messages": []}) == "Chat"
    assert detect_format({"instruction": "a", "output": "b"}) == "Instruction"
    assert detect_format({"prompt": "a", "completion": "b"}) == "Completion"
    assert detect_format({"text": "a"}) == "Text"
    path = tmp_path / "i.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "1 2", "output": "3"}) + "\n")
    fmt, [example] = load_examples(path)
    assert fmt == "Instruction"
    assert example.messages == (("user", "Add\n\n1 2"), ("assistant", "3"))
    assert example.reference == "3"
    path.write_text(json.dumps({"text": "free text"}) + "\n")
    fmt, [example] = load_examples(path)
    assert (fmt, example.reference, example.completion) == ("Text", None, "free text")


def test_validation_split_is_deterministic_and_never_empty() -> None:
    from kubetune_trainer.train.data import Example

    examples = [Example(i, prompt="p", completion=str(i)) for i in range(1, 21)]
    train, held = split_validation(examples, 10, seed=7)
    assert len(held) == 2 and len(train) == 18
    assert split_validation(examples, 10, seed=7) == (train, held)
    assert not set(map(id, train)) & set(map(id, held))
    _, one = split_validation(examples[:3], 1, seed=7)
    assert len(one) == 1


def test_first_record_of_unknown_shape_cannot_be_detected(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DatasetError, match=r"data\.jsonl:1: cannot detect the format"):
        load_examples(path)


def _chat_record(content: str) -> str:
    """A Chat record written as many tools write JSONL: raw non-ASCII characters."""
    return json.dumps({"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": "ok"}]},
                      ensure_ascii=False)


def test_line_and_paragraph_separators_inside_strings_do_not_end_a_line(
        tmp_path: Path) -> None:
    # U+2028, U+2029 and U+0085 are legal raw inside JSON strings (json.dumps with
    # ensure_ascii=False writes them so); only "\n" ends a JSONL line.
    path = tmp_path / "t.jsonl"
    separators = ["a\u2028b", "c\u2029d", "e\u0085f"]
    path.write_text("".join(_chat_record(text) + "\n" for text in separators)
                    + '{"messages": "late"}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_examples(path)
    assert str(caught.value).startswith(f"{path}:4: ")  # the line number has not shifted
    path.write_text("".join(_chat_record(text) + "\r\n" for text in separators),
                    encoding="utf-8")
    fmt, examples = load_examples(path)
    assert fmt == "Chat" and [e.line for e in examples] == [1, 2, 3]
    assert [e.messages[0][1] for e in examples] == separators


@pytest.mark.parametrize(("line", "problem"), [
    # Python refuses to turn more than 4300 digits into an int (a ValueError, not a
    # JSONDecodeError): once a bare ValueError, exit code 1, retried.
    ('{"text": "x", "n": ' + "1" * 4301 + "}", "4300"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
])
def test_lines_json_cannot_decode_name_file_and_line(tmp_path: Path, line: str | bytes,
                                                     problem: str) -> None:
    path = tmp_path / "t.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(_chat_record("fine").encode() + b"\n\n" + raw + b"\n")
    with pytest.raises(DatasetError) as caught:
        load_examples(path)
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{path}:3: ") and problem in str(caught.value)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _chat_record("hi").encode() + b"\n")
    assert load_examples(path)[0] == "Chat"
