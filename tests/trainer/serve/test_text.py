"""Stop strings: the first stop ends the text wherever the tokens split it, and matching costs
work linear in the generated text, however long the stops are (no model needed)."""

from __future__ import annotations

import random
import sys
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.serve.engines import text as text_module
from kubetune_trainer.serve.engines.text import TextAssembler


def assemble(pieces: list[str], stop: tuple[str, ...]) -> tuple[str, bool]:
    """What a client receives when the tokens decode to `pieces` (one piece per token)."""
    assembler = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop)
    out = []
    for token in range(len(pieces)):
        out.append(assembler.add(token))
        if assembler.stopped:
            break
    return "".join(out) + assembler.flush(), assembler.stopped


def reference(text: str, stop: tuple[str, ...]) -> str:
    """The text up to the first stop to complete (on a tie, the longer one), by brute force."""
    for end in range(len(text) + 1):
        ending = [s for s in stop if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))]
    return text


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["a", "<", "/", "s", ">", "b"], ("</s>",), "a"),  # one character per token
        (["a</", "s>b"], ("</s>",), "a"),  # split across two tokens
        (["x", "</s", ">"], ("</s>", "s>"), "x"),  # both end at once: the longer one wins
        (["ab", "c", "d"], ("bcd", "c"), "ab"),  # the first to complete, not the first listed
        (["</", "x>", "</", "s>"], ("</s>",), "</x>"),  # a partial stop that fails is sent
        (["aaa", "aab"], ("aaab",), "aa"),  # the automaton falls back and still matches
    ],
)
def test_a_stop_split_across_tokens_ends_the_text(
    pieces: list[str], stop: tuple[str, ...], expected: str
) -> None:
    text, stopped = assemble(pieces, stop)
    assert (text, stopped) == (expected, True)


def test_a_partial_stop_is_held_back_until_it_fails() -> None:
    pieces = ["a", "</", "s"]
    assembler = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), ("</s>",))
    assert [assembler.add(i) for i in range(3)] == ["a", "", ""]  # "</s" may still complete
    assert assembler.flush() == "</s"  # the generation ended: what was held back is sent


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text("ab<>", max_size=4), max_size=12),
    st.lists(st.text("ab<>", min_size=1, max_size=5), max_size=4),
)
def test_any_split_gives_the_text_up_to_the_first_stop(pieces: list[str], stops: list[str]) -> None:
    stop = tuple(stops)
    text, _ = assemble(pieces, stop)
    assert text == reference("".join(pieces), stop)


def count_lines(call: Any) -> int:
    """Python lines executed inside engines/text.py during `call()`: an operation count of the
    assembler's own work, independent of the machine's speed."""
    filename = text_module.__file__
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if frame.f_code.co_filename != filename:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def stop_work(tokens: int) -> int:
    """Work to assemble `tokens` one-character tokens against four 200k-character stops that
    match partially again and again but never complete (the finding's four 200k stops)."""
    rng = random.Random(0)
    pieces = [rng.choice("ab") for _ in range(tokens)]
    stop = ("a" * 200_000, "b" * 200_000, "ab" * 100_000, "aab" * 66_666 + "c")
    assembler = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop)

    def run() -> None:
        for token in range(tokens):
            assembler.add(token)

    return count_lines(run)


def test_stop_matching_work_grows_linearly_with_the_text() -> None:
    small, large = stop_work(300), stop_work(600)
    # Twice the text, about twice the work (a quadratic matcher does four times the work).
    assert large < 2.3 * small, (small, large)
    # And a bounded amount per character per stop, whatever the stops' length.
    assert large < 600 * 4 * 40, large
