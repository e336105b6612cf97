"""The server's wire format as pydantic models, and the OpenAPI 3.1 document built from them
that the server publishes at `/openapi.json` (as vLLM-style servers do).

The request models accept exactly what `requests.parse_request` accepts (tests/trainer/serve/
test_openapi.py checks the two agree on generated bodies), so the document cannot drift from
the parser unnoticed; the error model is the shape every 4xx and 5xx has. The parser stays
hand-written because its errors name the field and OpenAI's error code, one check at a time.
Bounds that depend on the server's limits (`max_tokens`) are filled in per server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from kubetune_trainer.serve.protocol import Limits, RequestError
from kubetune_trainer.serve.requests import (
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    ROLES,
    changes_nothing,
    max_answers,
    unimplemented_fields,
)
from kubetune_trainer.serve.structured import grammar_for


def _false(value: bool) -> bool:
    if value:
        raise ValueError("not supported")
    return value


# `false` only: Literal[False] would take a 0, since 0 == False.
Off = Annotated[StrictBool, AfterValidator(_false), WithJsonSchema({"const": False})]


def _zero(value: float) -> float:
    if value != 0:
        raise ValueError("not supported; only 0")
    return value


Penalty = Annotated[float, Field(ge=-2, le=2, strict=True), AfterValidator(_zero)]


def _unsupported(name: str) -> Any:
    """A field the server does not implement: only a value that changes nothing passes."""

    def check(value: Any) -> Any:
        if not changes_nothing(name, value):
            raise ValueError("not supported")
        return value

    return (
        Annotated[
            Any,
            AfterValidator(check),
            WithJsonSchema({"description": "Not supported: only a value that changes nothing"}),
        ],
        None,
    )


# Numbers are `float` with strict=True: a JSON integer or float, never a boolean or a string.


class _Open(BaseModel):
    """Unknown fields are ignored, as OpenAI's own clients send fields a server may not know."""

    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Open):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: StrictStr | list[TextPart]


class StreamOptions(_Open):
    include_usage: StrictBool = False


class TextFormat(_Open):
    type: Literal["text"]


class JsonObjectFormat(_Open):
    type: Literal["json_object"]


class JsonSchemaSpec(_Open):
    name: StrictStr
    schema_: dict[str, Any] = Field(
        default_factory=dict,
        alias="schema",
        description="A JSON schema; its keywords are checked when the request arrives.",
    )


class JsonSchemaFormat(_Open):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _compiles(value: Any) -> Any:
    """What the parser refuses (a schema llguidance cannot enforce), the model refuses too."""
    try:
        grammar_for(value)
    except RequestError as error:
        raise ValueError(error.message) from None
    return value


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat,
    Field(discriminator="type"),
    BeforeValidator(_compiles),
]


class _Generation(_Open):
    """The fields both endpoints take."""

    model: StrictStr = Field(description="The served model's name (see /v1/models).")
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, strict=True)] | None = 1.0
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = Field(
        None, description="Makes sampling reproducible."
    )
    stop: (
        Annotated[StrictStr, Field(min_length=1)]
        | Annotated[
            list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)
        ]
        | None
    ) = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = Field(None, description="Only 0 (not supported).")
    frequency_penalty: Penalty | None = Field(None, description="Only 0 (not supported).")
    response_format: ResponseFormat | None = Field(
        None, description="JSON output, enforced token by token (constrained decoding)."
    )
    echo: Off | None = Field(None, description="Not supported.")


class _Completion(_Generation):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] = Field(
        description="A string, or a list of exactly one string."
    )
    logprobs: Off | Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS[False])] | None = Field(
        None, description="Each token's log-probability and this many alternatives."
    )


class _ChatCompletion(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool | None = Field(None, description="Each token's log-probability.")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS[True])] | None = Field(
        None, description="Alternatives per token; needs logprobs: true."
    )

    @model_validator(mode="after")
    def _alternatives_need_logprobs(self) -> _ChatCompletion:
        if self.top_logprobs and self.logprobs is not True:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class _Tokenize(_Open):
    model: StrictStr | None = Field(None, description="Optional; if given, the served model.")
    add_special_tokens: StrictBool | None = Field(
        None, description="Default: true for a prompt, false for messages (as generation)."
    )
    add_generation_prompt: StrictBool | None = Field(None, description="Default true.")


class TokenizePromptRequest(_Tokenize):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]


class TokenizeChatRequest(_Tokenize):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Open):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        description="Ids of the model's vocabulary."
    )


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadLoraAdapterRequest(_Open):
    """vLLM's body: load (or replace) the PEFT LoRA adapter at `lora_path` as `lora_name`."""

    lora_name: StrictStr
    lora_path: StrictStr = Field(description="A PEFT adapter directory on the server.")


class UnloadLoraAdapterRequest(_Open):
    lora_name: StrictStr


class LoraAdapterChange(BaseModel):
    lora_name: str
    status: str = Field(description='"loaded", "replaced" or "unloaded".')


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server answers, 4xx or 5xx: OpenAI's shape."""

    error: ErrorDetail


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="An adapter's base model (its id).")
    root: str | None = Field(
        None, description="An adapter's own name (never a path on the server)."
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Status(BaseModel):
    """What the probes answer: "alive", "ready", or why not ("stalled", "loading", ...)."""

    status: str
    error: str | None = None


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The completions and chat completions request bodies under these limits."""
    count = Annotated[StrictInt, Field(ge=1, le=limits.max_tokens)] | None
    tokens: dict[str, Any] = {
        "max_tokens": (count, Field(None, description=f"Default {limits.default_max_tokens}.")),
        "max_completion_tokens": (count, Field(None, description="Wins over max_tokens.")),
        "n": (
            Annotated[StrictInt, Field(ge=1, le=max_answers(limits))] | None,
            Field(None, description="How many answers; each takes a place in admission."),
        ),
    }
    completion = create_model(
        "CompletionRequest",
        __base__=_Completion,
        **tokens,
        **{name: _unsupported(name) for name in unimplemented_fields(chat=False)},
    )
    chat = create_model(
        "ChatCompletionRequest",
        __base__=_ChatCompletion,
        **tokens,
        **{name: _unsupported(name) for name in unimplemented_fields(chat=True)},
    )
    return completion, chat


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


ERRORS = {"default": _json("ErrorResponse", "An error, 4xx (the client's) or 5xx (the server's)")}


def _generation(schema: str, summary: str, answer: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **_json(schema, "The request")},
            "responses": {
                "200": {
                    "description": f"{answer}, or with `stream` a text/event-stream of chunks; "
                    "a generation that fails once the stream has begun ends it with an "
                    '`{"error": ...}` event (ErrorResponse) before `[DONE]`',
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **ERRORS,
            },
        }
    }


def _post(schema: dict[str, Any], summary: str, answer: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            },
            "responses": {"200": _json(answer, "The answer"), **ERRORS},
        }
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {**responses, **ERRORS}}}


OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""The endpoints that never ask for the API key: the kubelet's probes and Prometheus send
none, and none of them reads or returns anything a client sent (`http.api_key_middleware`)."""


def _secured(paths: dict[str, Any]) -> dict[str, Any]:
    """`paths` with the bearer key required and its 401 listed on every endpoint but the
    open ones."""
    secured: dict[str, Any] = {}
    for path, item in paths.items():
        if path in OPEN_PATHS:
            secured[path] = item
            continue
        secured[path] = {
            method: {
                **operation,
                "security": [{"apiKey": []}],
                "responses": {
                    "401": _json("ErrorResponse", "No API key, or a wrong one"),
                    **operation["responses"],
                },
            }
            for method, operation in item.items()
        }
    return secured


def openapi_document(limits: Limits, served_model: str, api_key: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint the server has; with `api_key`, every one
    but the probes and `/metrics` needs `Authorization: Bearer <key>`."""
    completion, chat = request_models(limits)
    _, schemas = models_json_schema(
        [
            (m, "validation")
            for m in (
                completion,
                chat,
                ErrorResponse,
                ModelList,
                Status,
                TokenizePromptRequest,
                TokenizeChatRequest,
                TokenizeResponse,
                DetokenizeRequest,
                DetokenizeResponse,
                LoadLoraAdapterRequest,
                UnloadLoraAdapterRequest,
                LoraAdapterChange,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
    status = _json("Status", "The answer")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "KubeTune inference server",
            "version": "1",
            "description": f"OpenAI-compatible completions for the model '{served_model}'.",
        },
        "paths": {
            "/v1/completions": _generation(
                "CompletionRequest", "Complete a prompt", "A completion"
            ),
            "/v1/chat/completions": _generation(
                "ChatCompletionRequest", "Answer a conversation", "A chat completion"
            ),
            "/tokenize": _post(
                {"anyOf": [_ref("TokenizePromptRequest"), _ref("TokenizeChatRequest")]},
                "Tokenize a prompt or a conversation as the completion endpoints do",
                "TokenizeResponse",
            ),
            "/detokenize": _post(
                _ref("DetokenizeRequest"), "Token ids back to text", "DetokenizeResponse"
            ),
            "/v1/load_lora_adapter": _post(
                _ref("LoadLoraAdapterRequest"),
                "Load a LoRA adapter, or replace the one of that name (404 unless the server "
                "runs with --enable-runtime-lora; 400 naming why an adapter cannot be served)",
                "LoraAdapterChange",
            ),
            "/v1/unload_lora_adapter": _post(
                _ref("UnloadLoraAdapterRequest"),
                "Unload a LoRA adapter (404 for a name not loaded, or without "
                "--enable-runtime-lora)",
                "LoraAdapterChange",
            ),
            "/v1/models": _get("The served model", {"200": _json("ModelList", "The models")}),
            "/healthz": _get(
                "Liveness: 503 while the engine has work it does not advance",
                {"200": status, "503": status},
            ),
            "/readyz": _get(
                "Readiness: 503 while loading, failed or draining", {"200": status, "503": status}
            ),
            "/metrics": _get(
                "Prometheus metrics",
                {"200": {"description": "Metrics", "content": {"text/plain": {}}}},
            ),
            "/openapi.json": _get(
                "This document",
                {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            ),
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }
    if api_key:
        document["paths"] = _secured(document["paths"])
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "The server's API key"}
        }
    return document
