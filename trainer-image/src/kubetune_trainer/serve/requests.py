"""Request validation for the OpenAI endpoints: a JSON body in, a `GenerationRequest` out.

Every way a request can be wrong maps to a `RequestError` with a 4xx status and OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`; the server never answers a client's
mistake with a 500 or a hang. Kept apart from `protocol` because the checks, one per field, are
most of the wire format's code, and the engines need only the types.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kubetune_trainer.serve.protocol import (
    GenerationRequest,
    Limits,
    RequestError,
    TokenizeRequest,
)
from kubetune_trainer.serve.structured import grammar_for

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4


def _int_in(*allowed: int) -> Callable[[Any], bool]:
    # `type(...) is int`: a JSON `false` is a bool, and False == 0 in Python.
    return lambda value: type(value) is int and value in allowed


def _number_is(target: float) -> Callable[[Any], bool]:
    return lambda value: type(value) in (int, float) and value == target


def _never(value: Any) -> bool:
    return False


# Request fields that would change the output and that this server does not implement, each
# with the values that change nothing (absent and null always do). Anything else is refused
# with a 400 naming the field: a client asking for JSON, tools or a penalty must not get free
# text back with a 200 (as `response_format` once did) and believe it was applied.
NOOP_VALUES: dict[str, Callable[[Any], bool]] = {
    "tools": lambda value: value == [],
    "tool_choice": lambda value: value == "none",
    "functions": lambda value: value == [],
    "function_call": lambda value: value == "none",
    "logit_bias": lambda value: value == {},
    "top_logprobs": _int_in(0),
    "best_of": _int_in(1),
    "suffix": lambda value: value == "",
    "prediction": _never,
    "audio": _never,
    "modalities": lambda value: value == ["text"],
    # vLLM's extensions, which OpenAI clients send through `extra_body`.
    "top_k": _int_in(-1, 0),
    "min_p": _number_is(0),
    "repetition_penalty": _number_is(1),
    "min_tokens": _int_in(0),
    "ignore_eos": lambda value: value is False,
    "guided_json": _never,
    "guided_regex": _never,
    "guided_choice": _never,
    "guided_grammar": _never,
}


# Chat implements `top_logprobs` (with `logprobs: true`); completions have `logprobs: N`.
CHAT_IMPLEMENTS = frozenset({"top_logprobs"})
MAX_TOP_LOGPROBS = {True: 20, False: 5}  # by `chat`: OpenAI's limits


def unimplemented_fields(chat: bool) -> list[str]:
    return [name for name in NOOP_VALUES if not (chat and name in CHAT_IMPLEMENTS)]


def changes_nothing(name: str, value: Any) -> bool:
    """Whether an unimplemented field's value leaves the output as if it were absent."""
    return value is None or NOOP_VALUES[name](value)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError(
            400, "request body is nested too deeply to parse", code="invalid_json"
        ) from None
    except ValueError as error:
        # JSONDecodeError, UnicodeDecodeError, and the int-conversion limit (a number with
        # more than 4300 digits) are all ValueErrors: the client's JSON, not the server.
        raise RequestError(
            400, f"request body is not valid JSON: {str(error)[:200]}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"'{name}' must be a number", param=name, code="invalid_type")
    if not low <= value <= high:
        raise RequestError(
            400,
            f"'{name}' must be between {low} and {high}, got {value}",
            param=name,
            code="invalid_value",
        )
    return float(value)


def _integer(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer", param=name, code="invalid_type")
    return value


def _text_content(content: Any, index: int) -> str:
    """Message content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        400, f"'{param}' must be a string or a list of text parts", param=param, code="invalid_type"
    )


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    messages = data.get("messages")
    if messages is None:
        raise RequestError(400, "'messages' is required", param="messages", code="missing_required")
    if not isinstance(messages, list):
        raise RequestError(
            400, "'messages' must be an array", param="messages", code="invalid_type"
        )
    if not messages:
        raise RequestError(
            400, "'messages' must not be empty", param="messages", code="empty_array"
        )
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(
                400,
                f"'messages[{index}]' must be an object",
                param=f"messages[{index}]",
                code="invalid_type",
            )
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                400,
                f"'messages[{index}].role' must be one of {', '.join(ROLES)}",
                param=f"messages[{index}].role",
                code="invalid_value",
            )
        parsed.append({"role": role, "content": _text_content(message.get("content"), index)})
    return parsed


def _prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if prompt is None:
        raise RequestError(400, "'prompt' is required", param="prompt", code="missing_required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(
            400,
            "'prompt' must be a string (or a list of exactly one string)",
            param="prompt",
            code="invalid_type",
        )
    return prompt


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > MAX_STOP_SEQUENCES
    ):
        raise RequestError(
            400,
            f"'stop' must be a non-empty string or up to {MAX_STOP_SEQUENCES} non-empty strings",
            param="stop",
            code="invalid_value",
        )
    return tuple(stop)


def _model(data: dict[str, Any], served: tuple[str, ...], required: bool) -> str:
    """The model the request names, one of `served` (the base first, then its adapters); the
    base when it may name none."""
    model = data.get("model")
    if model is None:
        if not required:
            return served[0]
        raise RequestError(400, "'model' is required", param="model", code="missing_required")
    if not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model", code="invalid_type")
    if model not in served:
        raise RequestError(
            404,
            f"The model '{model}' does not exist; this server serves "
            + ", ".join(f"'{name}'" for name in served),
            param="model",
            code="model_not_found",
        )
    return model


def _boolean(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be a boolean", param=name, code="invalid_type")
    return value


def parse_tokenize(data: dict[str, Any], served: tuple[str, ...]) -> TokenizeRequest:
    """A `/tokenize` body (vLLM's): `prompt`, or `messages`; `model` is optional (every served
    model shares the base's tokenizer)."""
    _model(data, served, required=False)
    chat = data.get("messages") is not None
    return TokenizeRequest(
        messages=_messages(data) if chat else None,
        prompt=None if chat else _prompt(data),
        add_special_tokens=_boolean(data, "add_special_tokens", not chat),
        add_generation_prompt=_boolean(data, "add_generation_prompt", True),
    )


def parse_detokenize(data: dict[str, Any], served: tuple[str, ...], vocab: int) -> list[int]:
    """A `/detokenize` body: `tokens`, ids of this model's vocabulary."""
    _model(data, served, required=False)
    tokens = data.get("tokens")
    if tokens is None:
        raise RequestError(400, "'tokens' is required", param="tokens", code="missing_required")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise RequestError(
            400, "'tokens' must be an array of integers", param="tokens", code="invalid_type"
        )
    outside = next((t for t in tokens if not 0 <= t < vocab), None)
    if outside is not None:
        raise RequestError(
            400,
            f"'tokens' has {outside}, outside this model's vocabulary [0, {vocab})",
            param="tokens",
            code="invalid_value",
        )
    return tokens


def max_answers(limits: Limits) -> int:
    """The most answers (`n`) one request may ask for: each is a sequence with a place in
    admission, so no more than the server admits at once."""
    return limits.max_concurrency + limits.max_queue


def _logprobs(data: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives to report per token, or None for no log-probabilities.

    Chat: `logprobs: true`, with `top_logprobs` alternatives (which needs `logprobs`).
    Completions: `logprobs: N` (N alternatives; `false`, as some clients send, is off).
    """
    limit = MAX_TOP_LOGPROBS[chat]
    name = "top_logprobs" if chat else "logprobs"
    if chat:
        wanted = data.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise RequestError(
                400, "'logprobs' must be a boolean", param="logprobs", code="invalid_type"
            )
        top = _integer(data, name)
        if top and wanted is not True:
            raise RequestError(
                400, "'top_logprobs' needs 'logprobs': true", param=name, code="invalid_value"
            )
        count = (top or 0) if wanted else None
    else:
        count = None if data.get(name) is False else _integer(data, name)
    if count is not None and not 0 <= count <= limit:
        raise RequestError(
            400, f"'{name}' must be between 0 and {limit}", param=name, code="invalid_value"
        )
    return count


def parse_request(
    data: dict[str, Any], chat: bool, served: tuple[str, ...], limits: Limits
) -> GenerationRequest:
    """Validate a completions or chat completions body; `RequestError` on the first problem.

    `served`: the model names requests may ask for, the base model's first."""
    model = _model(data, served, required=True)
    messages = _messages(data) if chat else None
    prompt = None if chat else _prompt(data)
    # Both names are checked (the schema in `schema` says so); the newer one wins.
    counts = {name: _integer(data, name) for name in ("max_tokens", "max_completion_tokens")}
    for name, count in counts.items():
        if count is not None and not 1 <= count <= limits.max_tokens:
            raise RequestError(
                400,
                f"'{name}' must be between 1 and {limits.max_tokens}, got {count}",
                param=name,
                code="invalid_value",
            )
    max_tokens = next(
        (c for c in (counts["max_completion_tokens"], counts["max_tokens"]) if c is not None),
        limits.default_max_tokens,
    )
    n = _integer(data, "n")
    most = max_answers(limits)
    if n is not None and not 1 <= n <= most:
        raise RequestError(
            400,
            f"'n' must be between 1 and {most} (this server's concurrency plus queue)",
            param="n",
            code="invalid_value",
        )
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(data, penalty, 0.0, -2.0, 2.0) != 0:  # 0 (what clients send) is a no-op
            raise RequestError(
                400,
                f"'{penalty}' is not supported by this server; send 0 or leave it out",
                param=penalty,
                code="unsupported_parameter",
            )
    for name in unimplemented_fields(chat):
        if not changes_nothing(name, data.get(name)):
            raise RequestError(
                400,
                f"'{name}' is not supported by this server and would change the output; "
                "leave it out",
                param=name,
                code="unsupported_parameter",
            )
    # `is`, not `in`: 0 == False, and a 0 is not a boolean.
    if data.get("echo") is not None and data.get("echo") is not False:
        raise RequestError(
            400, "'echo' is not supported", param="echo", code="unsupported_parameter"
        )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = data.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(
            400,
            "'stream_options' must be {\"include_usage\": bool}",
            param="stream_options",
            code="invalid_type",
        )
    seed = _integer(data, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(
            400, "'seed' must be a non-negative 64-bit integer", param="seed", code="invalid_value"
        )
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError(
            400, "'top_p' must be greater than 0", param="top_p", code="invalid_value"
        )
    return GenerationRequest(
        model=model,
        chat=chat,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        seed=seed,
        stop=_stop(data),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        grammar=grammar_for(data.get("response_format")),
        logprobs=_logprobs(data, chat),
        n=1 if n is None else n,
    )
