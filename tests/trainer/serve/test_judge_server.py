"""The judge against a real server: the built-in model's INT4 export served by this project's
server (with an API key), asked through the OpenAI-compatible chat completions API in both
orders. The 135M model is a poor judge; what is tested is the plumbing: every comparison sent,
its real reply read and counted, the key sent, and a failing judge reported, never taken for a
tie."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kubetune.api.spec import JudgeSpec
from kubetune_trainer.judge import (
    JudgeError,
    JudgeItem,
    Outcome,
    Verdict,
    judge_pairwise,
    outcome,
    parse_verdict,
)
from kubetune_trainer.sources import DATASETS_DIR
from tests.trainer.export.test_export import exported_model
from tests.trainer.serve.test_serve import LIMITS, Server, free_port

KEY = "kt-judge-0123456789abcdef"


@pytest.fixture(scope="module")
def judge_server() -> Iterator[Server]:
    running = Server(exported_model("INT4"), *LIMITS, "--api-key", KEY)
    yield running
    running.stop()


def ticket_items(count: int) -> list[JudgeItem]:
    """Tickets of the built-in test split: the reference queue against a wrong one."""
    lines = (DATASETS_DIR / "support-tickets/test.jsonl").read_text().splitlines()[:count]
    items = []
    for line in lines:
        _, user, assistant = json.loads(line)["messages"]
        wrong = "shipping" if assistant["content"] != "shipping" else "billing"
        items.append(JudgeItem(prompt=user["content"], base_answer=wrong,
                               fine_tuned_answer=assistant["content"]))
    return items


def spec(server: Server, model: str | None = None) -> JudgeSpec:
    return JudgeSpec(endpoint=server.url + "/v1", model=model or server.name,
                     rubric="The answer must be the queue the ticket belongs to.")


def test_every_item_is_judged_in_both_orders_and_every_reply_counted(
    judge_server: Server,
) -> None:
    items = ticket_items(2)
    result = judge_pairwise(spec(judge_server), KEY, items, max_tokens=24)
    assert result.comparisons == 4 and len(result.items) == 2
    assert result.wins + result.losses + result.ties == 4
    assert 0 <= result.unparsed <= result.ties
    assert result.win_rate == (result.wins + result.ties / 2) / 4
    for item in result.items:
        first, second = item.comparisons
        # Base shown first, then the fine-tuned answer first: position bias cancels.
        assert (first.fine_tuned_shown_as, second.fine_tuned_shown_as) == (Verdict.B, Verdict.A)
        for comparison in item.comparisons:
            assert comparison.reply.strip(), "the served model's reply came back empty"
            assert comparison.verdict == parse_verdict(comparison.reply)
            assert comparison.outcome == outcome(comparison.verdict,
                                                 comparison.fine_tuned_shown_as)
        expected = sum({Outcome.WIN: 1, Outcome.TIE: 0.5, Outcome.LOSS: 0}[c.outcome]
                       for c in item.comparisons) / 2
        assert item.score == expected
    # Greedy decoding: the same question gets the same reply.
    again = judge_pairwise(spec(judge_server), KEY, items[:1], max_tokens=24)
    assert [c.reply for c in again.items[0].comparisons] == [
        c.reply for c in result.items[0].comparisons
    ]


def test_a_judge_that_refuses_or_cannot_be_reached_is_an_error_not_a_tie(
    judge_server: Server,
) -> None:
    items = ticket_items(1)
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_pairwise(spec(judge_server), None, items, max_tokens=4)
    with pytest.raises(JudgeError, match="HTTP 401") as refused:
        judge_pairwise(spec(judge_server), "not-the-key", items, max_tokens=4)
    assert "not-the-key" not in str(refused.value)  # the error never repeats a key
    with pytest.raises(JudgeError, match="HTTP 404"):
        judge_pairwise(spec(judge_server, model="no-such-model"), KEY, items, max_tokens=4)
    closed = JudgeSpec(endpoint=f"http://127.0.0.1:{free_port()}/v1", model="m")
    with pytest.raises(JudgeError, match=r"judge http://127\.0\.0\.1:\d+/v1/chat/completions"):
        judge_pairwise(closed, KEY, items, max_tokens=4, timeout=10)
