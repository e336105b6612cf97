"""Adapters that change while the server runs: `POST /v1/load_lora_adapter` and
`POST /v1/unload_lora_adapter`, vLLM's names and bodies.

Refused with 404 unless the server was started with `--enable-runtime-lora` (or
KUBETUNE_RUNTIME_LORA=1): changing what a name answers with is an operator's act, not a
client's. With an API key they need it, as every other route. Loading a name that is loaded
replaces it: the weights are read and checked first (in a worker thread), then the name points
at them in one assignment on the event loop, so requests already running finish on the old
weights and every request that arrives after the 200 gets the new ones. A bad adapter (DoRA,
wrong shapes, missing files, another tokenizer) is refused with a 400 that says why, and the
loaded set is unchanged. Loads and unloads are serialized.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from kubetune_trainer.serve.adapters import AdapterError, check_tokenizer
from kubetune_trainer.serve.engines.base import AdapterHost
from kubetune_trainer.serve.http import read_body
from kubetune_trainer.serve.protocol import RequestError
from kubetune_trainer.serve.state import STATE, ServerState

log = logging.getLogger("kubetune.serve")


def _name(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(
            400, f"'{field}' must be a non-empty string", param=field, code="invalid_value"
        )
    return value


def _host(state: ServerState) -> AdapterHost:
    """The engine, once adapters may change at run time: 404 when the server was not started
    to allow it, 503 while the model is still loading."""
    if not state.runtime_lora:
        raise RequestError(
            404,
            "loading and unloading adapters at run time is off: start the server with "
            "--enable-runtime-lora (or KUBETUNE_RUNTIME_LORA=1)",
            code="runtime_lora_disabled",
        )
    state.refuse_if_closed()
    engine = state.engine
    if engine is None:
        raise RequestError(503, "the model is still loading", kind="server_error", code="loading")
    if not isinstance(engine, AdapterHost):
        raise RequestError(400, "this engine serves no adapters (--engine batch does)")
    return engine


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = await read_body(request, state.limits)
    engine = _host(state)
    name, path = _name(data, "lora_name"), Path(_name(data, "lora_path"))
    if name == state.name:
        raise RequestError(
            400, f"{name!r} is the base model's own name", param="lora_name", code="invalid_value"
        )

    def read() -> Any:
        weights = engine.read_adapter(name, path)
        check_tokenizer(name, path, state.model_dir)
        return weights

    async with state.adapter_changes:
        try:
            weights = await asyncio.to_thread(read)
        except AdapterError as error:
            log.warning("refused to load adapter %r: %s", name, error)
            raise RequestError(400, str(error), param="lora_path", code="invalid_adapter") from None
        replaced = name in engine.adapters
        # One assignment each, on the event loop: a request that starts after this line (and
        # so every request after the 200) resolves the name to the new weights.
        engine.adapters[name] = weights
        state.adapters[name] = path
    log.info("%s adapter %r from %s", "replaced" if replaced else "loaded", name, path)
    return web.json_response(
        {"lora_name": name, "status": "replaced" if replaced else "loaded"}
    )


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = await read_body(request, state.limits)
    engine = _host(state)
    name = _name(data, "lora_name")
    async with state.adapter_changes:
        if name not in engine.adapters:
            raise RequestError(
                404, f"no adapter named {name!r} is loaded", param="lora_name",
                code="model_not_found",
            )
        # Requests already running on it finish on it; new ones get 404 for the name.
        del engine.adapters[name]
        state.adapters.pop(name, None)
    log.info("unloaded adapter %r", name)
    return web.json_response({"lora_name": name, "status": "unloaded"})
