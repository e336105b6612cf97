"""`/tokenize` and `/detokenize` (vLLM's shape): the model's own tokenizer over HTTP, so a client
can count a prompt's tokens against the context before sending it, or read ids back as text.

A prompt is tokenized as `/v1/completions` tokenizes it and a conversation as
`/v1/chat/completions` renders it (chat template, generation prompt), so `count` is what a
completion request's `usage.prompt_tokens` will say. The work runs in a worker thread: a big
prompt or a slow template would otherwise stall every stream on the event loop. That thread pool
is the one completions tokenize on, so these requests take a place in the same admission
(429 beyond capacity, 503 once the server is closed): parallel 1 MiB bodies cannot queue there
ahead of admitted prompts, and a place is held until the thread ends, even if the client
has gone.
"""

from __future__ import annotations

from functools import partial

from aiohttp import web

from kubetune_trainer.serve.engines.base import Engine
from kubetune_trainer.serve.http import read_body
from kubetune_trainer.serve.protocol import RequestError, TokenizeRequest
from kubetune_trainer.serve.requests import parse_detokenize, parse_tokenize
from kubetune_trainer.serve.state import STATE
from kubetune_trainer.tokenizer import ServingTokenizer


def token_ids(tokenizer: ServingTokenizer, request: TokenizeRequest) -> list[int]:
    try:
        if request.messages is not None:
            text = tokenizer.render_chat(request.messages, request.add_generation_prompt)
        else:
            assert request.prompt is not None
            text = request.prompt
        return tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
    except Exception as error:  # a template may raise on a conversation it does not accept
        raise RequestError(400, f"cannot render the prompt: {error}", param="messages") from None


def _ready(request: web.Request) -> Engine:
    """The engine, once the server is open and the model loaded; 503 otherwise, as for
    completions."""
    state = request.app[STATE]
    state.refuse_if_closed()
    if state.engine is None:
        raise RequestError(503, "the model is still loading", kind="server_error", code="not_ready")
    return state.engine


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = _ready(request)
    parsed = parse_tokenize(await read_body(request, state.limits), state.served)
    ids = await state.run_admitted(partial(token_ids, engine.tokenizer, parsed))
    return web.json_response(
        {"count": len(ids), "max_model_len": state.limits.context_length, "tokens": ids}
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    tokenizer = _ready(request).tokenizer
    ids = parse_detokenize(
        await read_body(request, state.limits), state.served, tokenizer.vocab_size
    )
    text = await state.run_admitted(partial(tokenizer.decode, ids))
    return web.json_response({"prompt": text})
