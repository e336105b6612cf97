"""`python -m kubetune_trainer serve`: an OpenAI-compatible server on ONNX Runtime.

    serve --model DIR [--host 0.0.0.0] [--port 8000] [--served-model-name NAME]
          [--max-tokens N] [--max-concurrency N] [--max-queue N] [--max-body-bytes N]
          [--grace-seconds S] [--drain-seconds S] [--request-timeout-seconds S]
          [--engine-stall-seconds S] [--engine batch|genai] [--device CPU|CUDA]
          [--lora-modules NAME=DIR [NAME=DIR ...]] [--lora-modules-file PATH]
          [--enable-runtime-lora] [--api-key KEY]

`--engine batch` (the default) decodes every running request in one batched ONNX Runtime step
(continuous batching, `engines/batch`); `--engine genai` runs one onnxruntime-genai generator
per request (`engines/genai.py`), kept as a reference: it is slower on every measure
(bench/RESULTS.md).

Both engines run the model on the device the builder built it for (genai_config.json's
provider options: CUDA for `export --device CUDA`). `--device` (the operator passes
`serving.device`) states where the pod expects to run: an export built for another device, or a
CUDA export where onnxruntime has no CUDA execution provider, stops the server before the port
opens, with the reason.

`--lora-modules` serves PEFT LoRA adapters of the base model beside it, from one copy of the
base: a request's `model` picks the base's name or an adapter's NAME, `/v1/models` lists them
all, and requests for different adapters share the batch (`adapters`, `engines/batch/lora.py`).
`--lora-modules-file` adds the adapters of an AdapterSet JSON file (`kubetune.api.dataplane`:
what a pool's ConfigMap holds, so a restarted replica serves the current set); an adapter of
the file that cannot be served is skipped with a warning that names why, so one bad adapter
never keeps a shared server down (`--lora-modules` stops the server instead).
`--enable-runtime-lora` (or KUBETUNE_RUNTIME_LORA=1) turns on `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (`adapter_routes`): adapters loaded, replaced and unloaded under
traffic, no restart.

Each limit also reads `KUBETUNE_SERVE_<FLAG>` (e.g. KUBETUNE_SERVE_MAX_QUEUE). `--model` is an
exported model directory (or a run directory holding `onnx/`).

`--api-key` (vLLM's flag), or else `KUBETUNE_API_KEY` (how a pod gets it, from a Secret, out
of its args and the process list): every route but `/healthz`, `/readyz` and `/metrics` then
needs `Authorization: Bearer <key>` (what OpenAI clients send as `api_key`) and answers 401
in OpenAI's error shape without it. The key is never logged.

Lifecycle: the port opens at once (`/healthz` answers), the model loads and runs one warm-up
generation in the background, then `/readyz` turns 200. On SIGTERM or SIGINT `/readyz` turns
503 at once, new requests are still served for `--drain-seconds` (while the Service drops the
pod), then refused with 503; every in-flight request and stream may finish within
`--grace-seconds`, then the server exits 0, so a rolling update drops nothing. `/healthz`
turns 503 when the engine has had work without advancing for `--engine-stall-seconds` (a
wedged engine: the kubelet restarts the pod), and when the model failed to load: the error
is then also the container's termination message ($KUBETUNE_TERMINATION_LOG, default
/dev/termination-log), which the operator puts in the Serving condition. `/openapi.json`
describes every endpoint.

This module holds the command line, the app wiring and that lifecycle; the endpoints are in
`http.py` (probes, models, metrics, errors) and `completions.py` (generation); the state they
share between requests is `state.ServerState`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import ValidationError

from kubetune.api.dataplane import API_KEY_ENV, AdapterSet, write_termination_message
from kubetune.api.spec import Device
from kubetune_trainer.genai_model import ProviderError, built_for, execution_providers
from kubetune_trainer.serve.adapter_routes import load_lora_adapter, unload_lora_adapter
from kubetune_trainer.serve.adapters import (
    AdapterError,
    check_tokenizer,
    parse_lora_modules,
    read_adapter,
)
from kubetune_trainer.serve.completions import completion_handler
from kubetune_trainer.serve.engines.base import Engine
from kubetune_trainer.serve.http import (
    api_key_middleware,
    errors_middleware,
    healthz,
    metrics_endpoint,
    models,
    openapi,
    readyz,
)
from kubetune_trainer.serve.protocol import Limits
from kubetune_trainer.serve.schema import OPEN_PATHS
from kubetune_trainer.serve.state import STATE, ServerState
from kubetune_trainer.serve.tokens import detokenize, tokenize

log = logging.getLogger("kubetune.serve")
TERMINATION_LIMIT = 4096
"""Bytes of a termination message the kubelet keeps (it cuts the rest)."""


def build_app(
    model_dir: Path,
    name: str,
    limits: Limits,
    engine_kind: str = "batch",
    adapters: dict[str, Path] | None = None,
    api_key: str | None = None,
    runtime_lora: bool = False,
) -> web.Application:
    """The app; with `api_key`, every route but the probes and `/metrics` needs it. Its
    check runs inside `errors_middleware`, before any handler reads the body. With
    `runtime_lora`, adapters load and unload at run time (else those routes answer 404)."""
    middlewares: list[Middleware] = [errors_middleware]
    if api_key is not None:
        middlewares.append(api_key_middleware(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_body_bytes)
    app[STATE] = ServerState(
        name,
        model_dir,
        limits,
        engine_kind,
        dict(adapters or {}),
        runtime_lora=runtime_lora,
        api_key_required=api_key is not None,
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/completions", completion_handler(chat=False))
    app.router.add_post("/v1/chat/completions", completion_handler(chat=True))
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    return app


def app_runner(app: web.Application) -> web.AppRunner:
    """The runner the server runs under. `handler_cancellation`: when a client disconnects,
    its handler is cancelled, and with it the generation (a non-streamed request would
    otherwise hold its slot until `max_tokens`)."""
    return web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)


async def load_engine(app: web.Application) -> None:
    from kubetune_trainer.serve.engines.batch.scheduler import BatchEngine
    from kubetune_trainer.serve.engines.genai import GenAIEngine

    state = app[STATE]
    try:
        engine: Engine
        if state.engine_kind == "genai":
            engine = await asyncio.to_thread(GenAIEngine, state.model_dir, state.limits)
        else:
            engine = await asyncio.to_thread(
                BatchEngine, state.model_dir, state.limits, state.adapters, state.runtime_lora
            )
        seconds = await asyncio.to_thread(engine.warm_up)
        state.engine = engine  # the server is ready from here on
        log.info("model loaded and warmed up (%.2fs warm-up)", seconds)
    except Exception as error:
        state.error = f"{type(error).__name__}: {error}"
        log.exception("model failed to load")
        # /healthz now fails and the kubelet restarts the container; the termination message
        # is what the pod's lastState (and the FineTuneJob's Serving condition) says of it.
        write_termination_message(f"model failed to load: {state.error}"[:TERMINATION_LIMIT])


async def serve(
    model_dir: Path,
    host: str,
    port: int,
    name: str,
    limits: Limits,
    engine_kind: str,
    adapters: dict[str, Path],
    api_key: str | None = None,
    runtime_lora: bool = False,
) -> int:
    app = build_app(model_dir, name, limits, engine_kind, adapters, api_key, runtime_lora)
    runner = app_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("listening on http://%s:%d (model %s)", host, port, name)
    if api_key is None:
        log.info("no API key (--api-key, %s): every route is open", API_KEY_ENV)
    else:
        log.info("API key required on every route but %s", ", ".join(sorted(OPEN_PATHS)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(load_engine(app))
    await stop.wait()
    state = app[STATE]
    state.draining = True
    # Readiness goes false first; requests the Service still routes here during the drain
    # window are served, so a rollout or scale-down refuses nothing.
    log.info("draining: not ready, still serving for %.0fs", limits.drain_seconds)
    await asyncio.sleep(limits.drain_seconds)
    state.closed = True
    log.info("closed: %d request(s) in flight, grace %.0fs", state.inflight, limits.grace_seconds)
    if state.inflight:
        state.idle.clear()
    try:
        await asyncio.wait_for(state.idle.wait(), limits.grace_seconds)
    except TimeoutError:
        log.warning("grace period over with %d request(s) still in flight", state.inflight)
    loader.cancel()
    await runner.cleanup()
    if state.engine is not None:
        state.engine.shutdown()
    log.info("stopped")
    return 0


def default_served_name(model_dir: Path) -> str:
    """The model name without `--served-model-name`: the run's for a run's `onnx/`, else the
    directory's."""
    return model_dir.parent.name if model_dir.name == "onnx" else model_dir.name


def resolve_model_dir(path: Path) -> Path:
    for candidate in (path, path / "onnx"):
        if (candidate / "genai_config.json").is_file():
            return candidate
    raise SystemExit(f"serve: {path} has no genai_config.json (nor onnx/genai_config.json)")


RUNTIME_LORA_ENV = "KUBETUNE_RUNTIME_LORA"
"""Set to 1, as `--enable-runtime-lora` (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""

ENV_PREFIX = "KUBETUNE_SERVE_"
"""Every flag can also come from the environment: `--max-tokens` from
`KUBETUNE_SERVE_MAX_TOKENS` (the inference Deployment sets its limits this way)."""


def api_key_problem(key: str) -> str | None:
    """Why no client could send `key` in an `Authorization: Bearer` header, or None. An empty
    key (an empty Secret) would turn authentication off without anyone asking for it; an
    HTTP client sends visible ASCII only (RFC 9110 token68)."""
    if not key:
        return "is empty"
    if not all("!" <= char <= "~" for char in key):
        return "must be visible ASCII characters, without spaces (it travels in an HTTP header)"
    return None


def parse_options(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """The server's options from its command line, with defaults from `environ`."""

    def _env(flag: str, default: Any) -> Any:
        value = environ.get(ENV_PREFIX + flag.upper().replace("-", "_"))
        return default if value is None else type(default)(value)

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
    parser.add_argument(
        "--device",
        choices=("", *(d.value for d in Device)),
        default=_env("device", ""),
        help="CPU or CUDA: the device the export must have been built for, and run on "
        "(default: the export's own, from genai_config.json)",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=_env("lora_modules", "").split(),
        metavar="NAME=DIR",
        help="PEFT LoRA adapters of the base model to serve beside it, each selected by a "
        "request's `model` NAME (environment: space-separated)",
    )
    parser.add_argument(
        "--lora-modules-file",
        type=Path,
        default=_env("lora_modules_file", "") or None,
        metavar="PATH",
        help="an AdapterSet JSON file ({\"adapters\": [{\"name\": ..., \"path\": ...}]}) of "
        "adapters to serve from the start (a pool's ConfigMap); one that cannot be served is "
        "skipped with a warning",
    )
    parser.add_argument(
        "--enable-runtime-lora",
        action="store_true",
        default=environ.get(RUNTIME_LORA_ENV, "") in ("1", "true", "True"),
        help=f"allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: "
        f"${RUNTIME_LORA_ENV}=1)",
    )
    parser.add_argument(
        "--api-key",
        default=environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` on every route but /healthz, /readyz and "
        f"/metrics (default: ${API_KEY_ENV}, which keeps it out of the process list)",
    )
    for flag in (
        "max_tokens",
        "default_max_tokens",
        "max_concurrency",
        "max_queue",
        "max_body_bytes",
        "grace_seconds",
        "drain_seconds",
        "request_timeout_seconds",
        "engine_stall_seconds",
    ):
        default = getattr(defaults, flag)
        parser.add_argument(
            "--" + flag.replace("_", "-"), type=type(default), default=_env(flag, default)
        )
    args = parser.parse_args(argv)
    if args.api_key is not None:
        # Surrounding whitespace cannot travel in a header (it is stripped there), and a
        # Secret written from a file often ends in a newline: it is not part of the key.
        args.api_key = args.api_key.strip()
        problem = api_key_problem(args.api_key)
        if problem is not None:  # the message never repeats the key
            parser.error(f"the API key (--api-key or ${API_KEY_ENV}) {problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit as error:
        # A refusal before the port opens (no model, a bad adapter): the pod's termination
        # message says which, as it does for a model that fails to load later.
        if isinstance(error.code, str):
            write_termination_message(error.code[:TERMINATION_LIMIT])
        raise


def _main(argv: list[str] | None) -> int:
    defaults = Limits()
    args = parse_options(argv, os.environ)
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
        drain_seconds=args.drain_seconds,
        request_timeout_seconds=args.request_timeout_seconds,
        engine_stall_seconds=args.engine_stall_seconds,
    )
    check_device(args.device, model_dir, args.engine)
    name = args.served_model_name or default_served_name(model_dir)
    adapters = load_adapters(
        args.lora_modules, name, args.engine, model_dir, args.lora_modules_file
    )
    if args.enable_runtime_lora and args.engine != "batch":
        raise SystemExit("serve: --enable-runtime-lora needs --engine batch")
    return asyncio.run(
        serve(
            model_dir,
            args.host,
            args.port,
            name,
            limits,
            args.engine,
            adapters,
            args.api_key,
            args.enable_runtime_lora,
        )
    )


def check_device(device: str, model_dir: Path, engine_kind: str) -> None:
    """Stop before the port opens when the export cannot run where it was asked to: built for
    another device than `--device`, or for CUDA where the engine's library has no CUDA. (The
    engines check the same as they load; this turns it into a message and an exit at once,
    rather than a pod that never turns ready.)"""
    try:
        built = built_for(model_dir)
        if device and Device(device) is not built:
            raise ProviderError(
                f"--device {device}: {model_dir} was built for {built.value} (genai_config.json); "
                f"export it with --device {device} (serving.device) or serve it on {built.value}"
            )
        if engine_kind == "genai":
            import onnxruntime_genai as og

            from kubetune_trainer.serve.engines.genai import genai_config

            genai_config(og, model_dir)
        else:
            import onnxruntime as ort

            execution_providers(built, ort.get_available_providers())
    except ProviderError as error:
        raise SystemExit(f"serve: {error}") from None


def read_adapter_set(path: Path) -> AdapterSet:
    """An AdapterSet JSON file (`--lora-modules-file`); a file that is missing or not one
    stops the server, naming the file and the field."""
    try:
        return AdapterSet.model_validate_json(path.read_text())
    except OSError as error:
        raise AdapterError(f"--lora-modules-file {path}: {error.strerror}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in error.errors()
        )
        raise AdapterError(f"--lora-modules-file {path} is not an AdapterSet: {problems}") from None


def load_adapters(
    modules: list[str],
    base: str,
    engine_kind: str,
    model_dir: Path,
    modules_file: Path | None = None,
) -> dict[str, Path]:
    """`--lora-modules` and `--lora-modules-file`, each adapter read and checked before the
    port opens. A bad adapter of `--lora-modules` stops the server with a message that names
    it, instead of a pod that never turns ready; one of the file (a shared pool's set, which
    other teams' adapters share) is skipped with a warning, and the rest are served. (The
    engine reads them again as it builds its graph, so their weights are not held here.)"""
    try:
        paths = parse_lora_modules(modules)
        listed = read_adapter_set(modules_file).adapters if modules_file is not None else []
        names = [a.name for a in listed]
        twice = {n for n in names if names.count(n) > 1} | (set(names) & set(paths))
        if twice:
            raise AdapterError(f"adapter names given twice: {sorted(twice)}")
        if (paths or listed) and engine_kind != "batch":
            raise AdapterError("--lora-modules needs --engine batch")
        if base in paths or base in names:
            raise AdapterError(f"--lora-modules: {base!r} is the base model's own name")
        config = json.loads((model_dir / "genai_config.json").read_text())
        hidden = int(config["model"]["decoder"]["hidden_size"])
        for name, path in paths.items():
            read_adapter(name, path, hidden)
            check_tokenizer(name, path, model_dir)
    except AdapterError as error:
        raise SystemExit(f"serve: {error}") from None
    for adapter in listed:
        try:
            read_adapter(adapter.name, Path(adapter.path), hidden)
            check_tokenizer(adapter.name, Path(adapter.path), model_dir)
        except AdapterError as error:
            log.warning("--lora-modules-file %s: skipped: %s", modules_file, error)
            continue
        paths[adapter.name] = Path(adapter.path)
    return paths
