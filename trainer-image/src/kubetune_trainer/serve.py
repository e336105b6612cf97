"""`python -m kubetune_trainer serve`: an OpenAI-compatible server on ONNX Runtime.

    serve --model DIR [--host 0.0.0.0] [--port 8000] [--served-model-name NAME]
          [--max-tokens N] [--max-concurrency N] [--max-queue N] [--max-body-bytes N]
          [--grace-seconds S] [--engine batch|genai]

`--engine batch` (the default) decodes every running request in one batched ONNX Runtime step
(continuous batching, `serve_batch.py`); `--engine genai` runs one onnxruntime-genai generator
per request (`serve_engine.py`), kept as a reference: it is slower on every measure
(bench/RESULTS.md).

Each limit also reads `KUBETUNE_SERVE_<FLAG>` (e.g. KUBETUNE_SERVE_MAX_QUEUE). `--model` is an
exported model directory (or a run directory holding `onnx/`).

Lifecycle: the port opens at once (`/healthz` answers), the model loads and runs one warm-up
generation in the background, then `/readyz` turns 200. On SIGTERM or SIGINT the server stops
taking new work (503, `/readyz` 503), lets every in-flight request and stream finish within
`--grace-seconds`, then exits 0, so a rolling update drops nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from kubetune_trainer.serve_metrics import Metrics
from kubetune_trainer.serve_protocol import (
    ApiError,
    GenerationRequest,
    Limits,
    chunk,
    full_response,
    usage,
    usage_chunk,
)
from kubetune_trainer.serve_requests import parse_json, parse_request

log = logging.getLogger("kubetune.serve")
ENGINE: web.AppKey[Any] = web.AppKey("engine", object)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP-level failure (404, 405, 413, ...) in OpenAI's error shape too."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return error_response(ApiError(error.status, error.reason, kind=kind))


async def read_body(request: web.Request, limits: Limits) -> dict[str, Any]:
    too_large = ApiError(
        413, f"request body exceeds {limits.max_body_bytes} bytes", code="request_too_large"
    )
    if (request.content_length or 0) > limits.max_body_bytes:
        raise too_large
    body = await request.content.read(limits.max_body_bytes + 1)
    if len(body) > limits.max_body_bytes:
        raise too_large
    return parse_json(body)


def served_name(request: web.Request) -> str:
    return str(request.app[STATE]["name"])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state["draining"]:
        return web.json_response({"status": "draining"}, status=503)
    if state["error"]:
        return web.json_response({"status": "failed", "error": state["error"]}, status=503)
    if not state["ready"]:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready"})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    entry = {
        "id": state["name"],
        "object": "model",
        "created": state["created"],
        "owned_by": "kubetune",
    }
    return web.json_response({"object": "list", "data": [entry]})


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics: Metrics = request.app[STATE]["metrics"]
    engine = request.app[STATE].get("engine")
    if engine is not None:
        metrics.set_load(engine.running, engine.admitted - engine.running)
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


def completion_handler(chat: bool) -> Any:
    endpoint = "chat_completions" if chat else "completions"

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        metrics: Metrics = state["metrics"]
        started = time.monotonic()
        status = 500
        try:
            if state["draining"]:
                raise ApiError(
                    503, "the server is shutting down", kind="server_error", code="shutting_down"
                )
            if not state["ready"]:
                raise ApiError(
                    503, "the model is still loading", kind="server_error", code="not_ready"
                )
            engine = state["engine"]
            parsed = parse_request(
                await read_body(request, engine.limits), chat, state["name"], engine.limits
            )
            ids = engine.prompt_ids(parsed)
            engine.admit()
            state["inflight"] += 1
            state["idle"].clear()
            try:
                response = await generate(request, engine, parsed, ids, metrics, started)
            finally:
                state["inflight"] -= 1
                engine.release()
                if state["inflight"] == 0:
                    state["idle"].set()
            status = response.status
            return response
        except ApiError as error:
            status = error.status
            metrics.error(error.code or error.kind)
            return error_response(error)
        finally:
            metrics.request(endpoint, status, time.monotonic() - started)

    return handle


async def generate(
    request: web.Request,
    engine: Any,
    parsed: GenerationRequest,
    ids: list[int],
    metrics: Metrics,
    started: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    events, cancel = engine.start(parsed, ids, loop)
    name = served_name(request)
    stream: web.StreamResponse | None = None
    pieces: list[str] = []
    first = True
    try:
        while True:
            event = await events.get()
            if event.kind == "error":
                metrics.error("generation_failed")
                if stream is None:
                    raise ApiError(500, f"generation failed: {event.text}", kind="server_error")
                break
            if event.kind == "delta" and first:
                metrics.first_token(time.monotonic() - started)
            if parsed.stream and stream is None:
                stream = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await stream.prepare(request)
                await send(stream, chunk(parsed, name, None, None, first=True))
            if event.kind == "delta":
                first = False
                if stream is not None and event.text:
                    await send(stream, chunk(parsed, name, event.text, None))
                elif stream is None:
                    pieces.append(event.text)
                continue
            counts = usage(event.prompt_tokens, event.completion_tokens)
            metrics.tokens(event.prompt_tokens, event.completion_tokens)
            if stream is None:
                return web.json_response(
                    full_response(parsed, name, "".join(pieces), event.finish or "stop", counts)
                )
            await send(stream, chunk(parsed, name, None, event.finish))
            if parsed.include_usage:
                await send(stream, usage_chunk(parsed, name, counts))
            break
        assert stream is not None
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    except (ConnectionResetError, asyncio.CancelledError):
        cancel.set()  # the client went away: stop generating for it
        raise
    finally:
        cancel.set()


async def send(stream: web.StreamResponse, body: dict[str, Any]) -> None:
    await stream.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")


def build_app(
    model_dir: Path, name: str, limits: Limits, engine_kind: str = "batch"
) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=limits.max_body_bytes)
    idle = asyncio.Event()
    idle.set()
    app[STATE] = {
        "name": name,
        "created": int(time.time()),
        "ready": False,
        "draining": False,
        "error": None,
        "inflight": 0,
        "idle": idle,
        "metrics": Metrics(),
        "engine": None,
        "model_dir": model_dir,
        "limits": limits,
        "engine_kind": engine_kind,
    }
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completion_handler(chat=False))
    app.router.add_post("/v1/chat/completions", completion_handler(chat=True))
    return app


async def load_engine(app: web.Application) -> None:
    from kubetune_trainer.serve_batch import BatchEngine
    from kubetune_trainer.serve_engine import Engine

    state = app[STATE]
    try:
        kind = Engine if state["engine_kind"] == "genai" else BatchEngine
        engine = await asyncio.to_thread(kind, state["model_dir"], state["limits"])
        seconds = await asyncio.to_thread(engine.warm_up)
        state["engine"], state["ready"] = engine, True
        log.info("model loaded and warmed up (%.2fs warm-up)", seconds)
    except Exception as error:
        state["error"] = f"{type(error).__name__}: {error}"
        log.exception("model failed to load")


async def serve(
    model_dir: Path, host: str, port: int, name: str, limits: Limits, engine_kind: str
) -> int:
    app = build_app(model_dir, name, limits, engine_kind)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("listening on http://%s:%d (model %s)", host, port, name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(load_engine(app))
    await stop.wait()
    state = app[STATE]
    state["draining"] = True
    log.info(
        "draining: %d request(s) in flight, grace %.0fs", state["inflight"], limits.grace_seconds
    )
    idle: asyncio.Event = state["idle"]
    if state["inflight"]:
        idle.clear()
    try:
        await asyncio.wait_for(idle.wait(), limits.grace_seconds)
    except TimeoutError:
        log.warning("grace period over with %d request(s) still in flight", state["inflight"])
    loader.cancel()
    await runner.cleanup()
    if state["engine"] is not None:
        state["engine"].shutdown()
    log.info("stopped")
    return 0


def resolve_model_dir(path: Path) -> Path:
    for candidate in (path, path / "onnx"):
        if (candidate / "genai_config.json").is_file():
            return candidate
    raise SystemExit(f"serve: {path} has no genai_config.json (nor onnx/genai_config.json)")


def _env(flag: str, default: Any) -> Any:
    value = os.environ.get("KUBETUNE_SERVE_" + flag.upper().replace("-", "_"))
    return default if value is None else type(default)(value)


def main(argv: list[str] | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer serve")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--host", default=_env("host", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=_env("port", 8000))
    parser.add_argument("--served-model-name", default=_env("served_model_name", ""))
    parser.add_argument(
        "--engine",
        choices=("batch", "genai"),
        default=_env("engine", "batch"),
        help="batch (default): continuous batching on plain ONNX Runtime; genai: one "
        "onnxruntime-genai generator per request, in worker threads (see bench/RESULTS.md)",
    )
    for flag in (
        "max_tokens",
        "default_max_tokens",
        "max_concurrency",
        "max_queue",
        "max_body_bytes",
        "grace_seconds",
    ):
        default = getattr(defaults, flag)
        parser.add_argument(
            "--" + flag.replace("_", "-"), type=type(default), default=_env(flag, default)
        )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    model_dir = resolve_model_dir(args.model)
    config = json.loads((model_dir / "genai_config.json").read_text())
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        context_length=int(config["model"].get("context_length", defaults.context_length)),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        grace_seconds=args.grace_seconds,
    )
    name = args.served_model_name or (
        model_dir.parent.name if model_dir.name == "onnx" else model_dir.name
    )
    return asyncio.run(serve(model_dir, args.host, args.port, name, limits, args.engine))
