"""Continuous batching on plain ONNX Runtime, for the model the GenAI builder exports.

The server's default engine. One scheduler thread owns the batch. Between decode steps it
admits waiting requests: those admitted together are prefilled together (right padded, in
groups of bounded size), then each one's KV cache is copied into a row of the batch cache
(`kv.KVCache`). Every step decodes one token for every running sequence in a single
session run, so the weights are read once per step for the whole batch instead of once per
sequence: on a memory-bound CPU that is where aggregate throughput comes from. Finished or
cancelled sequences leave the batch at once.

Sequences of different lengths share a step through right padding: the builder's
GroupQueryAttention takes each row's length from its attention-mask sum, writes the new key and
value at that row's own position and never reads past it, so padded positions are inert (checked
against unbatched greedy decoding, token for token, in tests/trainer/serve/test_serve_batch.py).
onnxruntime-genai's own batching pads on the left instead, which its CPU attention decodes
wrongly; hence this scheduler rather than onnxruntime-genai's.

Per step the Python work is kept small: greedy rows are picked with one argmax over the batch,
and the step's events for all sequences reach the event loop in one thread-safe call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
import time
from pathlib import Path

import numpy as np

from kubetune_trainer.genai_model import stop_token_ids
from kubetune_trainer.serve.engines.base import (
    Event,
    Heartbeat,
    encode_prompt,
)
from kubetune_trainer.serve.engines.batch.decoder import Decoder
from kubetune_trainer.serve.engines.batch.kv import GROW
from kubetune_trainer.serve.engines.batch.lora import AdapterWeights
from kubetune_trainer.serve.engines.batch.sequences import (
    Outbox,
    Sequence,
    accept,
    choose,
    retire,
)
from kubetune_trainer.serve.engines.text import TextAssembler
from kubetune_trainer.serve.protocol import GenerationRequest, Limits
from kubetune_trainer.serve.structured import Grammars
from kubetune_trainer.tokenizer import ServingTokenizer

log = logging.getLogger("kubetune.serve")

# Padded tokens per prefill run: bounds a run's activations (logits are one position per row,
# `graph`); a longer prompt is prefilled in chunks.
PREFILL_TOKENS = 1024

# After a prefill, the step waits up to this long for the event loop to take the new
# sequences' first tokens. Between runs ONNX Runtime's pool threads spin on the cores the
# event loop (and, on one machine, the client) needs, so a first token handed over just before
# a step can wait for a core until the step ends: time to first token, measured in-process
# on 2 cores, varied 0.2-4.6 ms between the flush and its write.
FIRST_TOKEN_HANDOFF = 0.005


def prefill_groups(
    joined: list[Sequence], alone_above: int | None = None
) -> list[list[Sequence]]:
    """Split newly admitted sequences into prefill batches of similar prompt length; a prompt
    longer than `alone_above` (a LongRoPE model's switch, `Decoder.rope_switch`) alone."""
    groups: list[list[Sequence]] = []
    for sequence in sorted(joined, key=lambda s: len(s.prompt)):
        alone = alone_above is not None and len(sequence.prompt) > alone_above
        # Sorted, so this prompt is the group's widest: the group would pad every row to it.
        if (
            groups
            and not alone
            and (len(groups[-1]) + 1) * len(sequence.prompt) <= PREFILL_TOKENS
        ):
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    return groups


class BatchEngine:
    """Continuous batching in one scheduler thread; an `engines.base.Engine`."""

    def __init__(
        self,
        model_dir: Path,
        limits: Limits,
        adapters: dict[str, Path] | None = None,
        runtime_lora: bool = False,
    ) -> None:
        """`adapters`: LoRA adapters served on the base (name: PEFT directory), each selected
        by a request's `model`; with `runtime_lora` (or any adapter) the graph has LoRA branches,
        and `load_adapter` / `unload_adapter` change the set while it runs."""
        self.limits = limits
        self.tokenizer = ServingTokenizer.load(model_dir)
        self.eos = self.tokenizer.eos_token_id
        self.stops = stop_token_ids(model_dir, self.tokenizer)  # every end-of-turn token
        self.grammars = Grammars.of_model(model_dir, self.eos)
        self.running = 0  # the batch size, set by the scheduler thread each step
        self.positions = 0  # KV cache positions the batch holds, set with `running`
        self.decoder = Decoder(model_dir, lora=bool(adapters) or runtime_lora)
        # The adapters requests may name now. Read and written on the event loop only
        # (`start`, and the server's load and unload): a request takes the weights its name
        # has when it starts, and keeps them to its end, whatever is loaded meanwhile.
        self.adapters: dict[str, AdapterWeights] = {
            name: self.decoder.read_adapter(name, path) for name, path in (adapters or {}).items()
        }
        self.cache = self.decoder.batch_cache(limits.max_concurrency, limits.context_length)
        self.outbox = Outbox()
        self.incoming: queue.Queue[Sequence] = queue.Queue()
        self.stopped = threading.Event()
        self.heartbeat = Heartbeat()
        self.thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self.thread.start()

    def read_adapter(self, name: str, path: Path) -> AdapterWeights:
        """Read and check an adapter for this base's graph (in a worker thread: it reads
        files); `AdapterError` names what is wrong with it."""
        return self.decoder.read_adapter(name, path)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request, self.limits.context_length)

    def shutdown(self) -> None:
        self.stopped.set()

    def kv_cache_usage(self) -> float:
        return self.positions / (self.limits.max_concurrency * self.limits.context_length)

    def stalled_seconds(self) -> float:
        if not self.thread.is_alive() and not self.stopped.is_set():
            return math.inf  # the scheduler is gone: nothing will ever be generated
        return self.heartbeat.stalled_for()

    def start(
        self, request: GenerationRequest, ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Queue[Event], threading.Event]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        self.incoming.put(
            Sequence(
                request,
                ids,
                events,
                loop,
                cancel,
                TextAssembler(self.tokenizer.decode, request.stop),
                np.random.default_rng(seed),
                adapter=self.adapters.get(request.model),
                spell=self.grammars.spell,
            )
        )
        return events, cancel

    def warm_up(self) -> float:
        """One short generation through the scheduler, so the first request pays no set-up."""
        started = time.monotonic()
        request = GenerationRequest(
            model="",
            chat=False,
            messages=None,
            prompt="Hello",
            max_tokens=4,
            temperature=0,
            top_p=1.0,
            seed=0,
            stop=(),
            stream=False,
            include_usage=False,
        )

        async def once() -> None:
            ids = self.tokenizer.encode("Hello")
            events, _ = self.start(request, ids, asyncio.get_running_loop())
            while (event := await events.get()).kind == "delta":
                pass
            if event.kind == "error":
                raise RuntimeError(f"warm-up failed: {event.text}")

        asyncio.run(once())
        return time.monotonic() - started

    def _loop(self) -> None:
        batch: list[Sequence] = []
        while not self.stopped.is_set():
            try:
                self._iterate(batch)
            except Exception as error:  # a failed step (or a bug): fail its requests, keep serving
                log.exception("batch step failed; failing its %d request(s)", len(batch))
                for sequence in batch:
                    self.outbox.report(
                        sequence, Event("error", text=f"{type(error).__name__}: {error}")
                    )
                batch.clear()
                self.cache.release()
                self.outbox.flush()

    def _iterate(self, batch: list[Sequence]) -> None:
        joined = self._admit(batch, block=not batch)
        retire(batch, self.outbox, self.cache.move)
        self.running = len(batch)
        self.positions = sum(s.length for s in batch)
        if not batch:
            self.heartbeat.idle()
            self.outbox.flush()
            if self.cache.capacity > 4 * GROW:  # keep a small cache, free a big one
                self.cache.release()
            return
        # Events go out just before the step, so the event loop handles them while the step
        # runs (ONNX Runtime releases the GIL) rather than contending with this thread; first
        # tokens are seen taken first (`FIRST_TOKEN_HANDOFF`).
        self.outbox.flush(wait=FIRST_TOKEN_HANDOFF if joined else 0.0)
        self.heartbeat.beat()  # a step that never returns leaves this beat the last one
        logits = self.cache.step([s.last for s in batch], [s.length for s in batch])
        greedy = logits.argmax(axis=1).tolist()  # one call for the whole batch
        for row, sequence in enumerate(batch):
            sequence.length += 1
            accept(sequence, choose(sequence, logits[row], greedy[row]), self.stops, self.outbox)

    def _admit(self, batch: list[Sequence], block: bool) -> int:
        """Take waiting requests while there is room, prefill them and add them to the batch;
        how many were taken."""
        joined: list[Sequence] = []
        while len(batch) + len(joined) < self.limits.max_concurrency:
            try:
                sequence = (
                    self.incoming.get(timeout=0.1)
                    if block and not joined
                    else self.incoming.get_nowait()
                )
            except queue.Empty:
                break
            self.heartbeat.beat()  # work arrived: from here on, not advancing is a stall
            if sequence.cancel.is_set():
                self.outbox.report(
                    sequence, Event("done", finish="stop", prompt_tokens=len(sequence.prompt))
                )
                continue
            try:
                # Here, not in `start`: compiling a big schema would stall the event loop.
                sequence.constraint = self.grammars.constraint(sequence.request.grammar)
            except Exception as error:
                self.outbox.report(sequence, Event("error", text=f"grammar: {error}"))
                continue
            joined.append(sequence)
        for group in prefill_groups(joined, self.decoder.rope_switch):
            self._prefill(group, batch)
        return len(joined)

    def _prefill(self, group: list[Sequence], batch: list[Sequence]) -> None:
        """Prefill a group and add it to the batch; a failure fails only the group's requests."""
        self.outbox.flush()  # the running sequences' last tokens go out before a long prefill
        joined = 0
        try:
            last, present = self.decoder.prefill(
                [s.prompt for s in group],
                [s.adapter for s in group],
                PREFILL_TOKENS,
                self.cache.logits_dtype,
                self.heartbeat.beat,
            )
            needed = max(len(s.prompt) + s.request.max_tokens for s in [*batch, *group])
            self.cache.reserve(len(batch), needed)
            for index, sequence in enumerate(group):
                sequence.length = len(sequence.prompt)
                self.cache.store(len(batch), present, index, sequence.length, sequence.adapter)
                batch.append(sequence)
                joined += 1
                accept(sequence, choose(sequence, last[index]), self.stops, self.outbox)
        except Exception as error:
            log.exception("prefill failed")
            for sequence in group[joined:]:
                self.outbox.report(
                    sequence, Event("error", text=f"{type(error).__name__}: {error}")
                )
