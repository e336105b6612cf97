"""Which records go into which optimizer step, micro-batch and rank; and the tensors.

The order is a pure function of the seed, so every rank computes the same plan without
talking to the others, and a resumed run continues at a step index with no data state to save.

Each optimizer step takes `global_batch` records (as many sequences as the user asked for,
whatever the split). They are divided into micro-batches that every rank runs the same number
of (ZeRO-3 gathers parameters in every forward, so ranks must stay in lockstep):
- packing on: records are spread over micro-batches of about `token_budget` tokens, largest
  first into the lightest, and each micro-batch is one padding-free row with position ids
  restarting at every record and record boundaries for the attention (`attention.py`);
- packing off: records sorted by length are cut into micro-batches of `micro_batch_size`,
  each padded to its longest record.
Targets are shifted inside each record, so no record predicts its neighbour's first token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kubetune_trainer.train.encoding import IGNORE, Encoded


@dataclass(frozen=True)
class Schedule:
    """How many steps a run takes."""

    steps_per_epoch: int
    total_steps: int


def schedule(
    records: int, global_batch: int, world: int, epochs: int, max_steps: int | None
) -> Schedule:
    """Steps per epoch (a smaller last batch is kept if every rank gets a record) and in all."""
    per_epoch = records // global_batch + (1 if records % global_batch >= world else 0)
    per_epoch = max(per_epoch, 1)
    total = per_epoch * epochs
    return Schedule(per_epoch, min(total, max_steps) if max_steps else total)


def step_records(
    records: int, global_batch: int, seed: int, step: int, per_epoch: int
) -> list[int]:
    """Indices of the records of optimizer step `step` (0-based)."""
    epoch, index = divmod(step, per_epoch)
    order = list(range(records))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order[index * global_batch : (index + 1) * global_batch]


def _groups(count: int, world: int, records: int) -> int:
    """Micro-batches per step: a multiple of the world size, never more than the records."""
    count = math.ceil(max(count, 1) / world) * world
    return max(world, min(count, records // world * world))


def split_micro_batches(
    lengths: Sequence[int], world: int, packing: bool, token_budget: int, micro_batch_size: int
) -> list[list[int]]:
    """Positions (into `lengths`) of each micro-batch; micro-batch j runs on rank j % world."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if packing:
        count = _groups(math.ceil(sum(lengths) / token_budget), world, len(lengths))
        bins: list[list[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in order:
            lightest = min(range(count), key=lambda b: (loads[b], len(bins[b])))
            bins[lightest].append(i)
            loads[lightest] += lengths[i]
        return bins
    count = _groups(math.ceil(len(lengths) / micro_batch_size), world, len(lengths))
    size, extra = divmod(len(order), count)
    cuts = [0]
    for j in range(count):
        cuts.append(cuts[-1] + size + (1 if j < extra else 0))
    return [order[cuts[j] : cuts[j + 1]] for j in range(count)]


def _shifted(record: Encoded) -> list[int]:
    return [*record.labels[1:], IGNORE]


def collate(records: Sequence[Encoded], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs plus `targets` (already shifted) for one micro-batch."""
    if packing:
        ids = [t for r in records for t in r.input_ids]
        lengths = [len(r.input_ids) for r in records]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        boundaries = torch.tensor([0, *ends], dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "targets": torch.tensor([[t for r in records for t in _shifted(r)]]),
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": max(lengths),  # type: ignore[dict-item]
            "max_length_k": max(lengths),  # type: ignore[dict-item]
        }
    width = max(len(r.input_ids) for r in records)
    pad = [width - len(r.input_ids) for r in records]
    rows = list(zip(records, pad, strict=True))
    return {
        "input_ids": torch.tensor([r.input_ids + [pad_id] * p for r, p in rows]),
        "attention_mask": torch.tensor([[1] * len(r.input_ids) + [0] * p for r, p in rows]),
        "targets": torch.tensor([_shifted(r) + [IGNORE] * p for r, p in rows]),
    }


@dataclass(frozen=True)
class Step:
    """This rank's micro-batches of one optimizer step and the step's totals (all ranks)."""

    micro_batches: list[dict[str, torch.Tensor]]
    targets: int
    """Tokens with a loss in the whole step, over all ranks: the loss normaliser."""
    tokens: int
    """Real (non-pad) tokens in the whole step, over all ranks."""
    records: int


def build_step(
    data: Sequence[Encoded],
    step: int,
    per_epoch: int,
    *,
    global_batch: int,
    seed: int,
    world: int,
    rank: int,
    packing: bool,
    token_budget: int,
    micro_batch_size: int,
    pad_id: int,
) -> Step:
    """Everything rank `rank` needs for optimizer step `step`."""
    chosen = [data[i] for i in step_records(len(data), global_batch, seed, step, per_epoch)]
    groups = split_micro_batches(
        [len(r.input_ids) for r in chosen], world, packing, token_budget, micro_batch_size
    )
    mine = [collate([chosen[i] for i in g], packing, pad_id) for g in groups[rank::world]]
    return Step(
        micro_batches=mine,
        targets=sum(r.targets for r in chosen),
        tokens=sum(len(r.input_ids) for r in chosen),
        records=len(chosen),
    )
