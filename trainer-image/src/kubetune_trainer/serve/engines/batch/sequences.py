"""Per-sequence bookkeeping for the batching engine: a sequence's state, accepting a generated
token, retiring finished or cancelled sequences, and handing their events to the event loops.

Separate from the scheduler (`scheduler`) because none of it touches the model: it decides
when a sequence is over and what its client hears, whatever produced the tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from kubetune_trainer.serve.engines.base import Event
from kubetune_trainer.serve.engines.batch.lora import AdapterWeights
from kubetune_trainer.serve.engines.batch.sampling import sample
from kubetune_trainer.serve.engines.logprobs import describe, log_softmax
from kubetune_trainer.serve.engines.text import TextAssembler
from kubetune_trainer.serve.protocol import GenerationRequest, TokenLogprob
from kubetune_trainer.serve.structured import Constraint, ConstraintError


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt: list[int]
    events: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event
    text: TextAssembler
    rng: np.random.Generator
    adapter: AdapterWeights | None = None  # the LoRA adapter its rows add (`lora`); None: base
    length: int = 0  # positions in the KV cache
    generated: int = 0
    last: int = 0
    finish: str | None = None
    constraint: Constraint | None = None  # the grammar of `response_format`, if any
    failure: str | None = None  # why the sequence failed (its client gets an error)
    spell: Callable[[int], bytes] | None = None  # a token's bytes, for `logprobs`
    pending: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a delta


def _deliver(
    items: list[tuple[asyncio.Queue[Event], Event]], delivered: threading.Event | None
) -> None:
    for events, event in items:
        events.put_nowait(event)
    if delivered is not None:
        delivered.set()


class Outbox:
    """Events reported during a step, held until `flush` hands them to their event loops."""

    def __init__(self) -> None:
        self.items: list[tuple[Sequence, Event]] = []

    def report(self, sequence: Sequence, event: Event) -> None:
        self.items.append((sequence, event))

    def flush(self, wait: float = 0.0) -> None:
        """Hand this step's events to their event loops, one thread-safe call per loop; with
        `wait`, block up to that many seconds until every loop has taken them."""
        if not self.items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for sequence, event in self.items:
            by_loop.setdefault(sequence.loop, []).append((sequence.events, event))
        self.items.clear()
        handed: list[threading.Event] = []
        for loop, items in by_loop.items():
            delivered = threading.Event() if wait > 0 else None
            # A closed loop has nobody waiting for these events any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items, delivered)
                if delivered is not None:
                    handed.append(delivered)
        deadline = time.monotonic() + wait
        for delivered in handed:
            delivered.wait(max(0.0, deadline - time.monotonic()))


def choose(sequence: Sequence, logits: np.ndarray, greedy: int | None = None) -> int | None:
    """The sequence's next token from its row of logits (`greedy`: its argmax, if known).

    A constrained sequence's row is masked by its grammar first (in place); with `logprobs`,
    the token's log-probability under the unmasked row is kept for its delta. None when the
    grammar fails (`failure` says why): the sequence is then over.
    """
    wanted = sequence.request.logprobs
    raw = log_softmax(logits) if wanted is not None else None
    if sequence.constraint is not None:
        try:
            sequence.constraint.mask(logits)
        except ConstraintError as error:
            sequence.failure, sequence.finish = str(error), "error"
            return None
        greedy = None
    if sequence.request.temperature > 0:
        token = sample(logits, sequence.request, sequence.rng)
    else:
        token = int(logits.argmax()) if greedy is None else greedy
    if raw is not None and wanted is not None and sequence.spell is not None:
        sequence.pending.append(describe(raw, token, wanted, sequence.spell))
    return token


def _delta(sequence: Sequence, text: str) -> Event:
    """A text delta carrying the log-probabilities of the tokens it completes."""
    entries, sequence.pending = sequence.pending, []
    return Event("delta", text=text, completion_tokens=sequence.generated, logprobs=entries)


def accept(
    sequence: Sequence, token: int | None, stops: Collection[int], outbox: Outbox
) -> None:
    """Record one generated token (None: `choose` failed); set `finish` when the sequence is
    over (`stops`: the tokens that end an answer, `genai_model.stop_token_ids`)."""
    if token is None:
        return
    sequence.generated += 1
    sequence.last = token
    if token in stops:
        sequence.finish = "stop"
        if sequence.pending:
            sequence.pending.pop()  # the end of sequence is not part of the answer
        return
    delta = sequence.text.add(token)
    if delta or sequence.generated == 1:
        outbox.report(sequence, _delta(sequence, delta))
    if sequence.constraint is not None:
        try:
            sequence.constraint.advance(token)
        except ConstraintError as error:
            sequence.failure, sequence.finish = str(error), "error"
            return
    if sequence.text.stopped or (sequence.constraint is not None and sequence.constraint.complete):
        sequence.finish = "stop"
    elif sequence.generated >= sequence.request.max_tokens:
        sequence.finish = "length"


def retire(
    batch: list[Sequence], outbox: Outbox, move_row: Callable[[int, int, int], None]
) -> None:
    """Report finished or cancelled sequences; the last row moves into each freed row.

    `move_row(source, target, length)` moves a row's KV cache (`kv.KVCache.move`).
    """
    row = 0
    while row < len(batch):
        sequence = batch[row]
        if sequence.finish is None and sequence.cancel.is_set():
            sequence.finish = "stop"
        if sequence.finish is None:
            row += 1
            continue
        if sequence.failure is not None:
            outbox.report(sequence, Event("error", text=sequence.failure))
        else:
            tail = sequence.text.flush()  # empty after a stop sequence
            if tail:
                outbox.report(sequence, _delta(sequence, tail))
            done = Event(
                "done",
                finish=sequence.finish,
                prompt_tokens=len(sequence.prompt),
                completion_tokens=sequence.generated,
            )
            outbox.report(sequence, done)
        moved = batch.pop()
        if moved is not sequence:
            move_row(len(batch), row, moved.length)
            batch[row] = moved
