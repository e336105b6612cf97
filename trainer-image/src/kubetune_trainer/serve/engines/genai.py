"""Generation on ONNX Runtime GenAI, in worker threads, with bounded admission.

Each admitted request runs its own `og.Generator` in a worker thread (ONNX Runtime sessions are
safe to run concurrently), so the event loop only moves bytes. At most `max_concurrency`
requests generate at once and at most `max_queue` wait; the next one is refused (429) instead
of queueing without bound. Padded batching is not used: ONNX Runtime GenAI's CPU path only takes
left-padded batches and its CPU attention then decodes the padded rows wrongly (measured: rows
diverge from their unbatched greedy output after the first token), which no speed-up is worth.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.serve.protocol import ApiError, GenerationRequest, Limits
from kubetune_trainer.tokenizer import ServingTokenizer


@dataclass
class Event:
    """What a worker reports: a text delta, the end (finish reason + counts), or an error."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextAssembler:
    """Turns generated token ids into text deltas, holding back what is not yet final.

    Byte-level BPE may split a character across tokens: a trailing U+FFFD means "wait for the
    next token". Anything that could still be the start of a stop sequence is held back until
    it is not.

    Text is decoded incrementally: each token decodes only a short window of ids, from the
    previous boundary on, and appends what that window adds to its already settled part
    (decoding all ids for every token costs O(n) per token: ~0.1 ms per sequence at 1000
    tokens). Keeping one settled chunk of context in the window is what makes the difference
    right for decoders that treat the first token specially (SentencePiece's leading space).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[: self.read]
        self.prefix = 0  # ids[prefix:read] decode to the end of `text`: the window's context
        self.read = 0
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._advance(final=False)
        if text is None:
            return ""
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((self._partial_stop(text, s) for s in self.stop), default=0)
        return self._emit(text[: len(text) - hold])

    def _advance(self, final: bool) -> str | None:
        """All text so far, or None while the last token ends inside a character."""
        window = self.decode(self.ids[self.prefix :])
        if window.endswith("\ufffd") and not final:
            return None
        settled = self.decode(self.ids[self.prefix : self.read])
        if window.startswith(settled):
            self.text += window[len(settled) :]
        else:  # the new ids changed how the context decodes: decode everything once
            self.text = self.decode(self.ids)
        self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._advance(final=True) if self.read < len(self.ids) else self.text
        return self._emit(text or "")

    def _emit(self, upto: str) -> str:
        delta = upto[self.sent :]
        self.sent = max(self.sent, len(upto))
        return delta

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0


class EngineBase:
    """Prompt validation and admission, shared by both engines."""

    def __init__(self, model_dir: Path, limits: Limits) -> None:
        self.limits = limits
        self.tokenizer = ServingTokenizer.load(model_dir)
        self.eos = self.tokenizer.eos_token_id
        self.admitted = 0  # generating + waiting; touched only on the event loop
        self.running = 0

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        try:
            if request.chat:
                assert request.messages is not None
                ids = self.tokenizer.encode_chat(request.messages)
            else:
                assert request.prompt is not None
                ids = self.tokenizer.encode(request.prompt)
        except Exception as error:  # a template may raise on a conversation it does not accept
            raise ApiError(400, f"cannot render the prompt: {error}", param="messages") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(ids) + request.max_tokens > self.limits.context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.limits.context_length} tokens; "
                f"the prompt has {len(ids)} and max_tokens asks for {request.max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return ids

    def admit(self) -> None:
        """Reserve a place or refuse with 429; the caller must `release()` when done."""
        if self.admitted >= self.limits.max_concurrency + self.limits.max_queue:
            raise ApiError(
                429,
                "the server is at capacity; retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            )
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    def shutdown(self) -> None:
        """Stop generating; in-flight work is abandoned (the server drains before this)."""

    def start(
        self, request: GenerationRequest, ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        raise NotImplementedError

    def warm_up(self) -> float:
        raise NotImplementedError


class Engine(EngineBase):
    """One `og.Generator` per request, in a pool of `max_concurrency` worker threads."""

    def __init__(self, model_dir: Path, limits: Limits) -> None:
        import onnxruntime_genai as og

        super().__init__(model_dir, limits)
        self.og = og
        self.model = og.Model(str(model_dir))
        self.pool = ThreadPoolExecutor(limits.max_concurrency, thread_name_prefix="generate")

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

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
            try:
                self._generate(request, ids, report, cancel)
            except Exception as error:  # reported to the client as a server error, not a hang
                report(Event("error", text=f"{type(error).__name__}: {error}"))
            finally:
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
        text = TextAssembler(self.tokenizer.decode, request.stop)
        generated, finish = 0, "length"
        while generated < request.max_tokens and not cancel.is_set():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            generated += 1
            if token == self.eos:
                finish = "stop"
                break
            delta = text.add(token)
            if delta or generated == 1:  # the first token is reported even if held back (TTFT)
                report(Event("delta", text=delta, completion_tokens=generated))
            if text.stopped:
                finish = "stop"
                break
            if generator.is_done():
                break
        tail = text.flush()
        if tail:
            report(Event("delta", text=tail, completion_tokens=generated))
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
