"""Continuous batching on plain ONNX Runtime, for the model the GenAI builder exports.

The server's default engine. One scheduler thread owns the batch. Between decode steps it
admits waiting requests: those admitted together are prefilled together (right padded, in
groups of bounded size), then each one's KV cache is copied into a row of the batch cache
(`serve_kv.KVCache`). Every step decodes one token for every running sequence in a single
session run, so the weights are read once per step for the whole batch instead of once per
sequence: on a memory-bound CPU that is where aggregate throughput comes from. Finished or
cancelled sequences leave the batch at once.

Sequences of different lengths share a step through right padding: the builder's
GroupQueryAttention takes each row's length from its attention-mask sum, writes the new key and
value at that row's own position and never reads past it, so padded positions are inert (checked
against unbatched greedy decoding, token for token, in tests/trainer/test_serve_batch.py).
onnxruntime-genai's own batching pads on the left instead, which its CPU attention decodes
wrongly; hence this scheduler rather than onnxruntime-genai's.

Per step the Python work is kept small: greedy rows are picked with one argmax over the batch,
and the step's events for all sequences reach the event loop in one thread-safe call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kubetune_trainer.serve_engine import EngineBase, Event, TextAssembler
from kubetune_trainer.serve_kv import GROW, KVCache
from kubetune_trainer.serve_protocol import GenerationRequest, Limits

log = logging.getLogger("kubetune.serve")

# Padded tokens per prefill run. The exported model returns logits for every position,
# (rows, width, vocab) floats, so this bounds that allocation (~200 MB at a 49k vocabulary);
# a longer prompt is prefilled in chunks.
PREFILL_TOKENS = 1024


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt: list[int]
    events: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event
    text: TextAssembler
    rng: np.random.Generator
    length: int = 0  # positions in the KV cache
    generated: int = 0
    last: int = 0
    finish: str | None = None


def sample(logits: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling.

    This runs once per token of every sampled sequence, so it never sorts the whole vocabulary
    (an argsort of 49k floats took ~1.6 ms, a quarter of a decode step): only the tokens above a
    probability threshold are ranked, the threshold lowered tenfold at a time until the tokens
    above it hold `top_p` of the mass, so they contain the whole nucleus.
    """
    if request.temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / request.temperature
    probabilities = np.exp(scaled - scaled.max())  # the most likely token has 1
    total = probabilities.sum()
    if request.top_p >= 1.0:
        cumulative = np.cumsum(probabilities)
        drawn = cumulative.searchsorted(rng.random() * total, side="right")
        return int(min(drawn, len(probabilities) - 1))
    threshold = 0.1
    while threshold > 1e-300:
        candidates = np.flatnonzero(probabilities >= threshold)
        if probabilities[candidates].sum() >= request.top_p * total:
            break
        threshold /= 10
    else:
        candidates = np.arange(len(probabilities))
    order = candidates[np.argsort(-probabilities[candidates], kind="stable")]
    cumulative = np.cumsum(probabilities[order]) / total
    keep = order[: int(np.searchsorted(cumulative, request.top_p)) + 1]
    kept = probabilities[keep] / probabilities[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


def prefill_groups(joined: list[Sequence]) -> list[list[Sequence]]:
    """Split newly admitted sequences into prefill batches of similar prompt length."""
    groups: list[list[Sequence]] = []
    for sequence in sorted(joined, key=lambda s: len(s.prompt)):
        # Sorted, so this prompt is the group's widest: the group would pad every row to it.
        if groups and (len(groups[-1]) + 1) * len(sequence.prompt) <= PREFILL_TOKENS:
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    return groups


def _deliver(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for events, event in items:
        events.put_nowait(event)


class BatchEngine(EngineBase):
    """Same interface as `serve_engine.Engine`: prompt_ids, admit/release, start, warm_up."""

    def __init__(self, model_dir: Path, limits: Limits) -> None:
        import json

        import onnxruntime as ort

        super().__init__(model_dir, limits)
        model = json.loads((model_dir / "genai_config.json").read_text())["model"]
        config = model["decoder"]
        # ONNX Runtime's defaults measured fastest here: one intra-op thread per core, spinning.
        self.session = ort.InferenceSession(
            str(model_dir / config["filename"]), providers=["CPUExecutionProvider"]
        )
        layers = int(config["num_hidden_layers"])
        self.kv_shape = (int(config["num_key_value_heads"]), int(config["head_size"]))
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past"))
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.kv_names = [
            f"past_key_values.{layer}.{part}"
            for layer in range(layers)
            for part in ("key", "value")
        ]
        self.output_names = ["logits"] + [
            n.replace("past_key_values", "present") for n in self.kv_names
        ]
        self.cache = KVCache(
            self.session,
            self.kv_names,
            self.kv_shape,
            self.kv_dtype,
            limits.max_concurrency,
            int(model["vocab_size"]),
            limits.context_length,
        )
        self.outbox: list[tuple[Sequence, Event]] = []
        self.incoming: queue.Queue[Sequence] = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        self.stopped.set()

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
            )
        )
        return events, cancel

    def warm_up(self) -> float:
        """One short generation through the scheduler, so the first request pays no set-up."""
        started = time.monotonic()
        request = GenerationRequest(
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
                    self._report(sequence, Event("error", text=f"{type(error).__name__}: {error}"))
                batch.clear()
                self.cache.release()
                self._flush()

    def _iterate(self, batch: list[Sequence]) -> None:
        self._admit(batch, block=not batch)
        self._retire(batch)
        self.running = len(batch)
        if not batch:
            self._flush()
            if self.cache.capacity > 4 * GROW:  # keep a small cache, free a big one
                self.cache.release()
            return
        # Events go out just before the step, so the event loop handles them while the step
        # runs (ONNX Runtime releases the GIL) rather than contending with this thread.
        self._flush()
        logits = self.cache.step([s.last for s in batch], [s.length for s in batch])
        greedy = logits.argmax(axis=1).tolist()  # one call for the whole batch
        for row, sequence in enumerate(batch):
            sequence.length += 1
            if sequence.request.temperature == 0:
                self._accept(sequence, greedy[row])
            else:
                self._accept(sequence, sample(logits[row], sequence.request, sequence.rng))

    def _admit(self, batch: list[Sequence], block: bool) -> None:
        """Take waiting requests while there is room, prefill them and add them to the batch."""
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
            if sequence.cancel.is_set():
                self._report(
                    sequence, Event("done", finish="stop", prompt_tokens=len(sequence.prompt))
                )
                continue
            joined.append(sequence)
        for group in prefill_groups(joined):
            self._prefill(group, batch)

    def _prefill(self, group: list[Sequence], batch: list[Sequence]) -> None:
        """Prefill a group and add it to the batch; a failure fails only the group's requests."""
        self._flush()  # the running sequences' last tokens go out before a long prefill
        joined = 0
        try:
            last, present = self._forward(group)
            needed = max(len(s.prompt) + s.request.max_tokens for s in [*batch, *group])
            self.cache.reserve(len(batch), needed)
            for index, sequence in enumerate(group):
                sequence.length = len(sequence.prompt)
                self.cache.store(len(batch), present, index, sequence.length)
                batch.append(sequence)
                joined += 1
                self._accept(sequence, sample(last[index], sequence.request, sequence.rng))
        except Exception as error:
            log.exception("prefill failed")
            for sequence in group[joined:]:
                self._report(sequence, Event("error", text=f"{type(error).__name__}: {error}"))

    def _forward(self, group: list[Sequence]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the group's prompts: each row's last logits, and the present key/values.

        At most PREFILL_TOKENS padded tokens go through one run. `prefill_groups` keeps a group
        of several prompts within that, so only a prompt alone can take several runs: chunks
        whose past is the previous chunk's present (exactly what one run computes).
        """
        width = max(len(s.prompt) for s in group)
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for row, sequence in enumerate(group):
            ids[row, : len(sequence.prompt)] = sequence.prompt
            mask[row, : len(sequence.prompt)] = 1
        heads, size = self.kv_shape
        present = [np.zeros((len(group), heads, 0, size), self.kv_dtype)] * len(self.kv_names)
        last = np.zeros((len(group), self.cache.vocab), self.cache.logits_dtype)
        chunk = max(1, PREFILL_TOKENS // len(group))
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            feeds = {
                "input_ids": ids[:, start:end],
                "attention_mask": mask[:, :end],
                **dict(zip(self.kv_names, present, strict=True)),
            }
            logits, *present = self.session.run(self.output_names, feeds)
            for row, sequence in enumerate(group):
                if start < len(sequence.prompt) <= end:
                    last[row] = logits[row, len(sequence.prompt) - 1 - start]
        return last, present

    def _accept(self, sequence: Sequence, token: int) -> None:
        """Record one generated token; set `finish` when the sequence is over."""
        sequence.generated += 1
        sequence.last = token
        if token == self.eos:
            sequence.finish = "stop"
            return
        delta = sequence.text.add(token)
        if delta or sequence.generated == 1:
            self._report(sequence, Event("delta", text=delta, completion_tokens=sequence.generated))
        if sequence.text.stopped:
            sequence.finish = "stop"
        elif sequence.generated >= sequence.request.max_tokens:
            sequence.finish = "length"

    def _retire(self, batch: list[Sequence]) -> None:
        """Report finished or cancelled sequences; the last row moves into each freed row."""
        row = 0
        while row < len(batch):
            sequence = batch[row]
            if sequence.finish is None and sequence.cancel.is_set():
                sequence.finish = "stop"
            if sequence.finish is None:
                row += 1
                continue
            tail = sequence.text.flush()  # empty after a stop sequence
            if tail:
                self._report(
                    sequence, Event("delta", text=tail, completion_tokens=sequence.generated)
                )
            done = Event(
                "done",
                finish=sequence.finish,
                prompt_tokens=len(sequence.prompt),
                completion_tokens=sequence.generated,
            )
            self._report(sequence, done)
            moved = batch.pop()
            if moved is not sequence:
                self.cache.move(len(batch), row, moved.length)
                batch[row] = moved

    def _report(self, sequence: Sequence, event: Event) -> None:
        self.outbox.append((sequence, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one thread-safe call per loop."""
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for sequence, event in self.outbox:
            by_loop.setdefault(sequence.loop, []).append((sequence.events, event))
        self.outbox.clear()
        for loop, items in by_loop.items():
            # A closed loop has nobody waiting for these events any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)
