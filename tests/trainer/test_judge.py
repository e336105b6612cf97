"""The judge's pure parts: the prompt it is sent, how its reply is read, and the tally in both
orders (the real server answering: tests/trainer/serve/test_judge_server.py)."""

from __future__ import annotations

import pytest

from kubetune_trainer.judge import (
    DEFAULT_RUBRIC,
    Comparison,
    ItemVerdict,
    Outcome,
    Verdict,
    judge_messages,
    outcome,
    parse_verdict,
    tally,
)


def test_the_prompt_shows_both_answers_in_the_order_given_and_asks_for_a_verdict() -> None:
    messages = judge_messages("Route: my card was charged twice", "billing", "shipping")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.startswith(DEFAULT_RUBRIC)
    assert user.index("Route: my card was charged twice") < user.index("[Answer A]\nbilling\n")
    assert user.index("[Answer A]\nbilling\n") < user.index("[Answer B]\nshipping\n")
    assert "[[A]]" in user and "[[B]]" in user and "[[tie]]" in user
    swapped = judge_messages("Route: my card was charged twice", "shipping", "billing",
                             rubric="The queue must match the ticket.")[1]["content"]
    assert swapped.startswith("The queue must match the ticket.")
    assert DEFAULT_RUBRIC not in swapped
    assert "[Answer A]\nshipping\n" in swapped and "[Answer B]\nbilling\n" in swapped


@pytest.mark.parametrize(("reply", "verdict"), [
    ("[[A]]", Verdict.A),
    ("Answer B is more complete.\n\n[[B]]", Verdict.B),
    ("[[ tie ]]", Verdict.TIE),
    ("[[C]]", Verdict.TIE),  # MT-Bench's tie
    # The last bracketed verdict counts: a judge may quote the format before deciding.
    ('The format is "[[A]]" or "[[B]]". Having compared them: [[B]]', Verdict.B),
    ("Verdict: A", Verdict.A),
    ("verdict - **B**", Verdict.B),
    ("After weighing both, the better answer is B.", Verdict.B),
    ("The better response is Answer A because it names the queue.", Verdict.A),
    ("I prefer B", Verdict.B),
    ("Winner: tie", Verdict.TIE),
    ("B", Verdict.B),
    ("a", Verdict.A),
    ("**Answer A.**", Verdict.A),
    ("Tie.", Verdict.TIE),
    # Names exactly one answer: that one.
    ("Answer A correctly names the billing queue.", Verdict.A),
    # States a tie without the format.
    ("Both are equally good.", Verdict.TIE),
    ("Neither is better than the other.", Verdict.TIE),
    ("The answer is equal in value.", Verdict.TIE),
    # The prompt's markers echoed back choose nothing (the built-in model's replies as a judge).
    ("The answer is:\n\n[End of answer A]\n\nThe answer is equal in value.", Verdict.TIE),
    ("cancellation\n[End of answer B]\n", Verdict.UNPARSED),
    ("[Answer A]\nbilling\n[End of answer A]\nAnswer B is right.", Verdict.B),
    # Names neither, or both without deciding: unparsed (counted as a tie, and counted).
    ("", Verdict.UNPARSED),
    ("I think this is a better way to phrase a ticket.", Verdict.UNPARSED),
    ("Answer A says billing and Answer B says shipping.", Verdict.UNPARSED),
    ("Both answers mention a queue.", Verdict.UNPARSED),
    ("Verdict: Both", Verdict.UNPARSED),
])
def test_parse_verdict(reply: str, verdict: Verdict) -> None:
    assert parse_verdict(reply) == verdict


def test_a_verdict_means_a_win_or_a_loss_by_where_the_fine_tuned_answer_was_shown() -> None:
    assert outcome(Verdict.A, fine_tuned_shown_as=Verdict.A) == Outcome.WIN
    assert outcome(Verdict.A, fine_tuned_shown_as=Verdict.B) == Outcome.LOSS
    assert outcome(Verdict.B, fine_tuned_shown_as=Verdict.B) == Outcome.WIN
    assert outcome(Verdict.B, fine_tuned_shown_as=Verdict.A) == Outcome.LOSS
    assert outcome(Verdict.TIE, fine_tuned_shown_as=Verdict.A) == Outcome.TIE
    assert outcome(Verdict.UNPARSED, fine_tuned_shown_as=Verdict.B) == Outcome.TIE


def _item(index: int, *verdicts: tuple[Verdict, Verdict]) -> ItemVerdict:
    comparisons = [Comparison(fine_tuned_shown_as=shown, reply=str(said), verdict=said,
                              outcome=outcome(said, shown)) for shown, said in verdicts]
    score = sum({Outcome.WIN: 1, Outcome.TIE: 0.5, Outcome.LOSS: 0}[c.outcome]
                for c in comparisons) / len(comparisons)
    return ItemVerdict(index=index, comparisons=comparisons, score=score)


def test_a_judge_that_always_picks_the_first_answer_scores_every_model_one_half() -> None:
    # Position bias cancels: each item is one win and one loss.
    items = [_item(i, (Verdict.B, Verdict.A), (Verdict.A, Verdict.A)) for i in range(3)]
    result = tally(items)
    assert (result.comparisons, result.wins, result.losses, result.ties) == (6, 3, 3, 0)
    assert result.win_rate == 0.5
    assert [item.score for item in result.items] == [0.5, 0.5, 0.5]


def test_the_tally_counts_ties_half_and_unparsed_replies_as_ties() -> None:
    items = [
        _item(0, (Verdict.B, Verdict.B), (Verdict.A, Verdict.A)),  # won both orders
        _item(1, (Verdict.B, Verdict.TIE), (Verdict.A, Verdict.UNPARSED)),
        _item(2, (Verdict.B, Verdict.A), (Verdict.A, Verdict.B)),  # lost both orders
    ]
    result = tally(items)
    assert (result.wins, result.losses, result.ties, result.unparsed) == (2, 2, 2, 1)
    assert result.win_rate == pytest.approx((2 + 2 / 2) / 6)
    assert [item.score for item in result.items] == [1.0, 0.5, 0.0]


def test_nothing_to_judge_has_no_win_rate() -> None:
    result = tally([])
    assert result.win_rate is None and result.comparisons == 0


def test_the_result_is_camel_case_in_json_like_the_reports() -> None:
    result = tally([_item(0, (Verdict.B, Verdict.B), (Verdict.A, Verdict.UNPARSED))])
    wire = result.model_dump(mode="json", by_alias=True)
    assert wire["winRate"] == 0.75 and wire["unparsed"] == 1
    assert wire["items"][0]["comparisons"][1]["fineTunedShownAs"] == "A"
    assert type(result).model_validate(wire) == result
