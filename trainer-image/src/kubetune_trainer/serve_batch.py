"""Continuous batching on plain ONNX Runtime, for the model the GenAI builder exports.

One scheduler thread owns the batch. Between decode steps it admits waiting requests: each new
prompt is prefilled alone (batch 1), then its KV cache joins the batch. Every step decodes one
token for every running sequence in a single session run, so the weights are read once per step
for the whole batch instead of once per sequence: on a memory-bound CPU that is where aggregate
throughput comes from. Finished or cancelled sequences leave the batch at once.

Sequences of different lengths share a step through right padding: the builder's
GroupQueryAttention takes each row's length from its attention-mask sum, writes the new key and
value at that row's own position and never reads past it, so padded positions are inert (checked
against unbatched greedy decoding, token for token). onnxruntime-genai's own batching pads on the
left instead, which its CPU attention decodes wrongly; hence this scheduler.

Status (`--engine batch`, not the default): it does scale (8 streams gave 3.8x its own single
stream on INT4) but its single stream is far slower than onnxruntime-genai's (9 vs 29 tok/s,
measured on a loaded 2-core machine), likely the per-step KV copy of a non-shared past/present
buffer and no IO binding, so its 8-stream aggregate only matched the per-request engine's.
Shared KV buffers bound through IO binding are the next step before it can be the default.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kubetune_trainer.serve_engine import EngineBase, Event, TextAssembler
from kubetune_trainer.serve_protocol import GenerationRequest, Limits


@dataclass
class Sequence:
    request: GenerationRequest
    prompt: list[int]
    report: Callable[[Event], object]
    cancel: threading.Event
    text: TextAssembler
    rng: np.random.Generator
    length: int = 0  # tokens in the KV cache
    generated: int = 0
    last: int = 0
    finish: str | None = None
    kv: dict[str, np.ndarray] = field(default_factory=dict)


def sample(logits: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling."""
    if request.temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / request.temperature
    scaled -= scaled.max()
    probabilities = np.exp(scaled)
    probabilities /= probabilities.sum()
    if request.top_p < 1.0:
        order = np.argsort(-probabilities)
        cumulative = np.cumsum(probabilities[order])
        keep = order[: int(np.searchsorted(cumulative, request.top_p)) + 1]
        kept = probabilities[keep] / probabilities[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probabilities), p=probabilities))


class BatchEngine(EngineBase):
    """Same interface as `serve_engine.Engine`: prompt_ids, admit/release, start, warm_up."""

    def __init__(self, model_dir: Path, limits: Limits) -> None:
        import json

        import onnxruntime as ort

        super().__init__(model_dir, limits)
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.session = ort.InferenceSession(
            str(model_dir / config["filename"]), providers=["CPUExecutionProvider"]
        )
        self.layers = int(config["num_hidden_layers"])
        self.kv_heads, self.head_size = int(config["num_key_value_heads"]), int(config["head_size"])
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past"))
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.kv_names = [
            f"past_key_values.{layer}.{part}"
            for layer in range(self.layers)
            for part in ("key", "value")
        ]
        self.output_names = ["logits"] + [
            n.replace("past_key_values", "present") for n in self.kv_names
        ]
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
                lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                cancel,
                TextAssembler(self.tokenizer.decode, request.stop),
                np.random.default_rng(seed),
            )
        )
        return events, cancel

    def warm_up(self) -> float:
        import time

        started = time.monotonic()
        ids = self.tokenizer.encode("Hello")
        kv = self._empty_kv(1)
        self._run(np.array([ids]), np.ones((1, len(ids)), np.int64), kv)
        return time.monotonic() - started

    def _empty_kv(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_size)
        return {name: np.zeros(shape, self.kv_dtype) for name in self.kv_names}

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, kv: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask, **kv}
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], dict(zip(self.kv_names, outputs[1:], strict=True))

    def _loop(self) -> None:
        batch: list[Sequence] = []
        kv: dict[str, np.ndarray] = {}
        while not self.stopped.is_set():
            joined = self._admit(batch, block=not batch)
            if joined:
                kv = self._merge(kv if batch else None, joined)
                batch.extend(joined)
            batch, kv = self._retire(batch, kv)
            self.running = len(batch)
            if not batch:
                continue
            lengths = np.array([s.length for s in batch])
            total = kv[self.kv_names[0]].shape[2] + 1
            mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
            try:
                logits, kv = self._run(np.array([[s.last] for s in batch]), mask, kv)
            except Exception as error:  # the whole step failed: fail its requests, keep serving
                for sequence in batch:
                    sequence.report(Event("error", text=f"{type(error).__name__}: {error}"))
                batch, kv = [], {}
                continue
            for row, sequence in enumerate(batch):
                sequence.length += 1
                self._accept(sequence, sample(logits[row, -1], sequence.request, sequence.rng))

    def _admit(self, batch: list[Sequence], block: bool) -> list[Sequence]:
        """Prefill waiting requests (alone, batch 1) while there is room in the batch."""
        joined: list[Sequence] = []
        while len(batch) + len(joined) < self.limits.max_concurrency:
            try:
                sequence = (
                    self.incoming.get(timeout=0.1)
                    if block and not joined
                    else (self.incoming.get_nowait())
                )
            except queue.Empty:
                break
            if sequence.cancel.is_set():
                sequence.report(Event("done", finish="stop", prompt_tokens=len(sequence.prompt)))
                continue
            try:
                ids = np.array([sequence.prompt])
                logits, sequence.kv = self._run(ids, np.ones_like(ids), self._empty_kv(1))
            except Exception as error:
                sequence.report(Event("error", text=f"{type(error).__name__}: {error}"))
                continue
            sequence.length = len(sequence.prompt)
            self._accept(sequence, sample(logits[0, -1], sequence.request, sequence.rng))
            joined.append(sequence)
        return joined

    def _accept(self, sequence: Sequence, token: int) -> None:
        """Record one generated token; set `finish` when the sequence is over."""
        sequence.generated += 1
        sequence.last = token
        if token == self.eos:
            sequence.finish = "stop"
            return
        delta = sequence.text.add(token)
        if delta or sequence.generated == 1:
            sequence.report(Event("delta", text=delta, completion_tokens=sequence.generated))
        if sequence.text.stopped:
            sequence.finish = "stop"
        elif sequence.generated >= sequence.request.max_tokens:
            sequence.finish = "length"
        elif sequence.cancel.is_set():
            sequence.finish = "cancelled"

    def _merge(
        self, current: dict[str, np.ndarray] | None, joined: list[Sequence]
    ) -> dict[str, np.ndarray]:
        """The batch KV cache with the new sequences' caches appended as rows (right padded)."""
        parts = [s.kv for s in joined]
        if current:
            parts.insert(0, current)
        width = max(p[self.kv_names[0]].shape[2] for p in parts)
        merged = {
            name: np.concatenate(
                [
                    np.pad(p[name], ((0, 0), (0, 0), (0, width - p[name].shape[2]), (0, 0)))
                    for p in parts
                ]
            )
            for name in self.kv_names
        }
        for sequence in joined:
            sequence.kv = {}
        return merged

    def _retire(
        self, batch: list[Sequence], kv: dict[str, np.ndarray]
    ) -> tuple[list[Sequence], dict[str, np.ndarray]]:
        """Report finished sequences and drop their rows (and padding nobody needs any more)."""
        keep = [i for i, s in enumerate(batch) if s.finish is None]
        for sequence in batch:
            if sequence.finish is not None:
                tail = sequence.text.flush()  # empty after a stop sequence
                if tail:
                    sequence.report(Event("delta", text=tail, completion_tokens=sequence.generated))
                sequence.report(
                    Event(
                        "done",
                        finish=sequence.finish.replace("cancelled", "stop"),
                        prompt_tokens=len(sequence.prompt),
                        completion_tokens=sequence.generated,
                    )
                )
        if len(keep) != len(batch) and kv:
            rows = np.array(keep, dtype=np.int64)
            width = max((batch[i].length for i in keep), default=0)
            kv = {name: value[rows, :, :width] for name, value in kv.items()}
        return [batch[i] for i in keep], kv
