"""Request parsing: every client mistake is an OpenAI-shaped 4xx, never an exception that
the server would answer with a plain-text 500."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune_trainer.serve.protocol import Limits, RequestError
from kubetune_trainer.serve.requests import parse_json, parse_request


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
    """What OpenAI's clients and LangChain send by default must still be served."""
    parse_request({"model": "m", "prompt": "hi", field: value}, False, ("m",), Limits())


# Property-based: whatever a client sends, parsing ends in a request or a 4xx RequestError.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "n", "role", "content")
REQUESTS = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8) | st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(("user", "system", "assistant", "x")),
                               "content": JSON}), max_size=3)},
    optional={"max_tokens": JSON, "stop": JSON, "seed": JSON, "temperature": JSON})


def _refused_or_parsed(call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except RequestError as refused:
        assert 400 <= refused.status < 500, refused


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_4xx(body: bytes) -> None:
    _refused_or_parsed(lambda: parse_json(body))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUESTS, st.booleans())
def test_any_json_request_parses_or_is_refused_with_a_4xx(data: dict, chat: bool) -> None:
    _refused_or_parsed(lambda: parse_request(data, chat, ("m",), Limits()))
