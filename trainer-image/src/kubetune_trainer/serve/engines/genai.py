"""The ONNX Runtime GenAI engine (`--engine genai`): one generator per request, in worker threads.

Each request runs its own `og.Generator` in a worker thread (ONNX Runtime sessions are safe to
run concurrently), so the event loop only moves bytes. At most `max_concurrency` requests
generate at once; the others wait in the pool's queue, which the server's admission bounds.
Padded batching is not used: ONNX Runtime GenAI's CPU path only takes left-padded batches and
its CPU attention then decodes the padded rows wrongly (measured: rows diverge from their
unbatched greedy output after the first token), which no speed-up is worth.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubetune.api.spec import Device
from kubetune_trainer.genai_model import (
    ProviderError,
    built_for,
    execution_providers,
    stop_token_ids,
)
from kubetune_trainer.serve.engines.base import (
    Event,
    Heartbeat,
    encode_prompt,
)
from kubetune_trainer.serve.engines.logprobs import describe, log_softmax
from kubetune_trainer.serve.engines.text import TextAssembler
from kubetune_trainer.serve.protocol import GenerationRequest, Limits, TokenLogprob
from kubetune_trainer.serve.structured import Grammars
from kubetune_trainer.tokenizer import ServingTokenizer

GENAI_PROVIDERS = {Device.CPU: None, Device.CUDA: "cuda"}
"""onnxruntime-genai's name for each device's execution provider (None: the CPU, which it
runs on when no provider is appended)."""


def genai_config(og: Any, model_dir: Path) -> Any:
    """The `og.Config` the model loads with: its providers set from the device the export was
    built for (`genai_model.built_for`), checked first, so that a CUDA export on an
    onnxruntime-genai without CUDA fails with the reason instead of the library's own error
    (or a silent CPU run)."""
    import onnxruntime as ort

    device = built_for(model_dir)
    execution_providers(device, ort.get_available_providers())  # onnxruntime-gpu is there
    if device is Device.CUDA and not og.is_cuda_available():
        raise ProviderError(
            "this export was built for CUDA but onnxruntime-genai has no CUDA support "
            "(onnxruntime_genai.is_cuda_available() is False): install onnxruntime-genai-cuda "
            "and give the pod a GPU"
        )
    config = og.Config(str(model_dir))
    config.clear_providers()
    provider = GENAI_PROVIDERS[device]
    if provider is not None:
        config.append_provider(provider)
    return config


class GenAIEngine:
    """One `og.Generator` per request, in a pool of `max_concurrency` worker threads; an
    `engines.base.Engine`."""

    def __init__(self, model_dir: Path, limits: Limits) -> None:
        import onnxruntime_genai as og

        self.limits = limits
        self.tokenizer = ServingTokenizer.load(model_dir)
        self.eos = self.tokenizer.eos_token_id
        self.stops = stop_token_ids(model_dir, self.tokenizer)  # every end-of-turn token
        self.grammars = Grammars.of_model(model_dir, self.eos)
        self.running = 0
        self.positions: dict[int, int] = {}  # per worker thread: its sequence's length
        self.positions_lock = threading.Lock()
        self.og = og
        self.model = og.Model(genai_config(og, model_dir))
        self.pool = ThreadPoolExecutor(limits.max_concurrency, thread_name_prefix="generate")
        self.heartbeat = Heartbeat()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request, self.limits.context_length)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def kv_cache_usage(self) -> float:
        with self.positions_lock:
            held = sum(self.positions.values())
        return held / (self.limits.max_concurrency * self.limits.context_length)

    def stalled_seconds(self) -> float:
        return self.heartbeat.stalled_for()

    def start(
        self, request: GenerationRequest, ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        """Run generation in a worker; events arrive on the returned queue."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()

        def report(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            self.running += 1
            self.heartbeat.beat()
            try:
                self._generate(request, ids, report, cancel)
            except Exception as error:  # reported to the client as a server error, not a hang
                report(Event("error", text=f"{type(error).__name__}: {error}"))
            finally:
                with self.positions_lock:
                    self.positions.pop(threading.get_ident(), None)
                self.heartbeat.idle()
                self.running -= 1

        self.pool.submit(work)
        return events, cancel

    def _generate(
        self,
        request: GenerationRequest,
        ids: list[int],
        report: Callable[[Event], None],
        cancel: threading.Event,
    ) -> None:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + request.max_tokens}
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else random.getrandbits(31)
            options.update(
                do_sample=True,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=0,
                random_seed=seed % (2**31),
            )
        else:
            options.update(do_sample=False)
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        constraint = self.grammars.constraint(request.grammar)
        wanted = request.logprobs
        pending: list[TokenLogprob] = []  # log-probabilities not yet sent with a delta
        text = TextAssembler(self.tokenizer.decode, request.stop)
        generated, finish = 0, "length"
        while generated < request.max_tokens and not cancel.is_set():
            raw = None
            if constraint is not None or wanted is not None:
                logits = generator.get_logits()
                row = logits.reshape(-1)  # one sequence: (1, 1, vocab)
                if wanted is not None:
                    raw = log_softmax(row)  # the model's own distribution, before the mask
                if constraint is not None:
                    # The generator samples from the logits it is given: mask them first.
                    constraint.mask(row)
                    generator.set_logits(row.reshape(logits.shape))
            generator.generate_next_token()
            self.heartbeat.beat()
            token = int(generator.get_next_tokens()[0])
            generated += 1
            with self.positions_lock:
                self.positions[threading.get_ident()] = len(ids) + generated
            if token in self.stops:
                finish = "stop"
                break
            if raw is not None and wanted is not None:
                pending.append(describe(raw, token, wanted, self.grammars.spell))
            delta = text.add(token)
            if delta or generated == 1:  # the first token is reported even if held back (TTFT)
                report(Event("delta", text=delta, completion_tokens=generated, logprobs=pending))
                pending = []
            if constraint is not None:
                constraint.advance(token)
            if text.stopped or (constraint is not None and constraint.complete):
                finish = "stop"
                break
            if generator.is_done():
                break
        tail = text.flush()
        if tail:
            report(Event("delta", text=tail, completion_tokens=generated, logprobs=pending))
        report(Event("done", finish=finish, prompt_tokens=len(ids), completion_tokens=generated))

    def warm_up(self) -> float:
        """One short generation, so the first real request does not pay for session set-up."""
        import numpy as np

        started = time.monotonic()
        params = self.og.GeneratorParams(self.model)
        ids = self.tokenizer.encode("Hello")
        params.set_search_options(max_length=len(ids) + 4, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return time.monotonic() - started
