"""Request parsing: every client mistake is an OpenAI-shaped 4xx, never an exception that
the server would answer with a plain-text 500."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune_trainer.serve.protocol import GenerationRequest, Limits, RequestError
from kubetune_trainer.serve.requests import ROLES, max_answers, parse_json, parse_request


@pytest.mark.parametrize(("body", "named"), [
    (b"[" * 100_000, "nested too deeply"),                      # RecursionError in json
    (b'{"model": "m", "seed": ' + b"9" * 5000 + b"}", "digits"),  # int conversion limit
    (b'{"model": "m", "prompt": "\xff"}', "not valid JSON"),
    (b'{"model": ', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_a_malformed_body_is_a_400_naming_the_problem(body: bytes, named: str) -> None:
    with pytest.raises(RequestError) as refused:
        parse_json(body)
    assert refused.value.status == 400
    assert named in str(refused.value)


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 10**30), ("seed", -1), ("temperature", float("nan")),
    ("temperature", float("inf")), ("max_tokens", 10**6), ("top_p", "high"),
])
def test_an_out_of_range_field_is_a_400_naming_it(field: str, value: object) -> None:
    body = {"model": "m", "prompt": "hi", field: value}
    with pytest.raises(RequestError) as refused:
        parse_request(body, False, ("m",), Limits())
    assert refused.value.status == 400 and refused.value.param == field


# Each of these once came back as free text with a 200, the field silently ignored.
# (`response_format` was one too; it is enforced now: tests/trainer/serve/test_structured.py.)
@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("top_k", 5), ("top_k", False),
    ("min_p", 0.1), ("repetition_penalty", 1.2), ("suffix", "!"), ("best_of", 2),
    ("guided_json", {"type": "object"}), ("ignore_eos", True),
])
def test_a_field_that_would_change_the_output_and_is_not_implemented_is_a_400(
    field: str, value: object
) -> None:
    for chat in (False, True):
        body = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                field: value}
        with pytest.raises(RequestError) as refused:
            parse_request(body, chat, ("m",), Limits())
        assert refused.value.status == 400 and refused.value.param == field
        assert refused.value.code == "unsupported_parameter"


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"),
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("top_k", -1), ("top_k", 0),
    ("logit_bias", {}), ("best_of", 1), ("repetition_penalty", 1.0), ("user", "u1"),
    ("response_format", None),
])
def test_a_default_value_of_an_unimplemented_field_is_accepted(field: str, value: object) -> None:
    """What OpenAI's clients and LangChain send by default must still be served, and served
    exactly as if the field were absent (it is accepted because it changes nothing)."""
    for chat in (False, True):
        body = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 7, "temperature": 0.5, "seed": 3}
        with_it = parse_request({**body, field: value}, chat, ("m",), Limits())
        without = parse_request(body, chat, ("m",), Limits())
        assert _comparable(with_it) == _comparable(without), (field, value, chat)


def _comparable(request: GenerationRequest) -> GenerationRequest:
    """The request without what differs on every parse (its id and creation time)."""
    return replace(request, request_id="", created=0)


# Property-based: whatever a client sends, parsing ends in a request that carries the client's
# values, or in a 4xx whose `param` names the field at fault.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
VALID = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
"""A request both endpoints serve: every example starts from it, so that it gets past the
model and prompt checks to the fields it varies."""
TEXT = st.text(max_size=12)
ACCEPTED = {
    "model": st.just("m"),
    "prompt": TEXT | st.lists(TEXT, min_size=1, max_size=1),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES),
                                                "content": TEXT}), min_size=1, max_size=3),
    "max_tokens": st.integers(1, Limits().max_tokens),
    "max_completion_tokens": st.integers(1, Limits().max_tokens),
    "temperature": st.floats(0, 2) | st.integers(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.sampled_from((-1, 0)),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.text(min_size=1, max_size=4)
    | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "n": st.integers(1, max_answers(Limits())),
    "echo": st.just(False),
    "presence_penalty": st.just(0),
    "response_format": st.sampled_from(({"type": "text"}, {"type": "json_object"})),
}
"""Values each field accepts: an example sets some of them, and its values must come back."""
FIELDS = (*ACCEPTED, "logprobs", "top_logprobs", "role", "content")
NEAR_MISSES = st.sampled_from((
    0, -1, 2**63, 10**6, 1e9, float("nan"), float("inf"), True, "", "m2", [], [""], ["a"] * 5,
    {"include_usage": 1}, {"type": "json_schema"}, [{"role": "user"}], [{"content": "hi"}],
))
"""Values one step outside what fields accept."""
CONVERSATIONS = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(("user", "system", "assistant", "x")),
                           "content": JSON}), max_size=3)


def _wrong_values(field: str) -> st.SearchStrategy[Any]:
    return NEAR_MISSES | JSON | (CONVERSATIONS if field == "messages" else st.nothing())


def _field_of(param: str) -> str:
    """The request's top-level field a `param` names: `messages[0].role` -> `messages`."""
    return re.split(r"[.\[]", param, maxsplit=1)[0]


def _repaired(data: dict[str, Any], field: str) -> dict[str, Any]:
    """`data` with `field` set to what VALID has there, or removed."""
    repaired = {name: value for name, value in data.items() if name != field}
    if field in VALID:
        repaired[field] = VALID[field]
    return repaired


def _given(data: dict[str, Any], name: str, default: object) -> object:
    value = data.get(name)
    return default if value is None else value


def _check_carries(data: dict[str, Any], chat: bool, parsed: GenerationRequest) -> None:
    """An accepted request generates what the client asked for: no value dropped or replaced."""
    limits = Limits()
    assert parsed.model == data["model"] and parsed.chat == chat
    if chat:
        assert parsed.prompt is None and parsed.messages is not None
        assert [m["role"] for m in parsed.messages] == [m["role"] for m in data["messages"]]
        for sent, kept in zip(data["messages"], parsed.messages, strict=True):
            assert isinstance(sent["content"], list) or kept["content"] == sent["content"]
    else:
        prompt = data["prompt"]  # a string, or a list of exactly one
        assert parsed.messages is None
        assert parsed.prompt == (prompt[0] if isinstance(prompt, list) else prompt)
    asked = _given(data, "max_completion_tokens", _given(data, "max_tokens", None))
    assert parsed.max_tokens == (limits.default_max_tokens if asked is None else asked)
    assert 1 <= parsed.max_tokens <= limits.max_tokens
    assert parsed.temperature == _given(data, "temperature", 1.0)
    assert 0 <= parsed.temperature <= 2
    assert parsed.top_p == _given(data, "top_p", 1.0) and 0 < parsed.top_p <= 1
    assert parsed.seed == data.get("seed")
    assert parsed.n == _given(data, "n", 1)
    assert parsed.stream is _given(data, "stream", False)
    options = _given(data, "stream_options", {})
    assert isinstance(options, dict)
    assert parsed.include_usage is options.get("include_usage", False)
    stop = _given(data, "stop", ())
    assert parsed.stop == ((stop,) if isinstance(stop, str) else tuple(stop))


def _check_names_the_fault(data: dict[str, Any], chat: bool, refused: RequestError) -> None:
    """A refusal is a 4xx whose `param` names the field at fault: with that field repaired,
    the request is accepted or refused for another field."""
    assert 400 <= refused.status < 500, refused
    assert refused.param is not None, f"{refused} names no field"
    field = _field_of(refused.param)
    if refused.code == "missing_required":
        assert data.get(field) is None, refused
    else:
        assert field in data, refused
    try:
        parse_request(_repaired(data, field), chat, ("m",), Limits())
    except RequestError as again:
        assert again.param is not None and _field_of(again.param) != field, (refused, again)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_4xx(body: bytes) -> None:
    try:
        parsed = parse_json(body)
    except RequestError as refused:
        assert refused.status == 400 and refused.code == "invalid_json", refused
    else:
        assert parsed == json.loads(body) and isinstance(parsed, dict)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=ACCEPTED), st.booleans())
def test_a_request_of_accepted_values_is_served_as_sent(
    accepted: dict[str, Any], chat: bool
) -> None:
    data = {**VALID, **accepted}
    _check_carries(data, chat, parse_request(data, chat, ("m",), Limits()))


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chat=st.booleans())
def test_any_value_of_a_field_is_served_as_sent_or_refused_naming_it(
    field: str, data: st.DataObject, chat: bool
) -> None:
    """Accepted values in the other fields, anything in `field`: parsing ends in a request
    that carries the client's values, or a 4xx whose `param` names the field at fault."""
    body = {**VALID, **data.draw(st.fixed_dictionaries({}, optional=ACCEPTED)),
            field: data.draw(_wrong_values(field))}
    try:
        parsed = parse_request(body, chat, ("m",), Limits())
    except RequestError as refused:
        _check_names_the_fault(body, chat, refused)
    else:
        _check_carries(body, chat, parsed)
