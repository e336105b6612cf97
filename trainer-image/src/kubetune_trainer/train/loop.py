"""The optimizer-step loop: micro-batches, logging, periodic evaluation, checkpoints.

A checkpoint is written every `checkpoint.everySteps` steps and at the last step, before that
step's evaluation and before the outputs are saved: an eviction or an OOM in an evaluation
then costs no training, and a restart after the last step goes straight to the outputs. On a
stop signal (`stop.py`) every rank checkpoints at the step boundary and `errors.Stopped` is
raised.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kubetune.api import RunConfig
from kubetune_trainer.errors import Stopped
from kubetune_trainer.train import checkpoint, distributed
from kubetune_trainer.train.distributed import Ranks
from kubetune_trainer.train.evaluate import eval_loss
from kubetune_trainer.train.microbatches import build_step
from kubetune_trainer.train.prepare import PreparedData
from kubetune_trainer.train.report import MetricsLog, Reporter, progress_body
from kubetune_trainer.train.stepper import Stepper
from kubetune_trainer.train.stop import StopSignal, signal_name

log = logging.getLogger("kubetune_trainer")

CRASH_ENV = "KUBETUNE_TEST_CRASH_AFTER_STEP"
"""Test hook: the process exits abruptly (no report) right after this optimizer step."""


@dataclass
class LoopResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    seconds: float


def token_budget(run: RunConfig) -> int:
    """Tokens per packed micro-batch: what `micro_batch_size` full-length records take."""
    return run.plan.micro_batch_size * run.spec.training.max_seq_length


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _global_sum(value: float, ranks: Ranks, device: torch.device) -> float:
    if ranks.world == 1 or not dist.is_initialized():
        return value
    box = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(box)
    return float(box.item())


def checkpoint_due(done: int, every_steps: int, total_steps: int) -> bool:
    """Every `every_steps` steps, and always at the last one (the outputs come after it)."""
    return done % every_steps == 0 or done == total_steps


def run_steps(run: RunConfig, data: PreparedData, stepper: Stepper, ranks: Ranks,
              device: torch.device, output: Path, start_step: int, pad_id: int,
              resumed_loss: float | None = None, stop: StopSignal | None = None) -> LoopResult:
    """Steps `start_step`..total; `resumed_loss` is the checkpoint's loss (the result's train
    loss when no step is left to run). Raises `Stopped` once `stop` has recorded a signal."""
    training, sched = run.spec.training, data.schedule
    stop = stop or StopSignal()
    metrics = MetricsLog(output / "metrics.jsonl")
    reporter = Reporter.from_env() if ranks.is_main else Reporter(None, None, 0)
    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    eval_every = training.eval_every_steps or sched.steps_per_epoch
    budget = token_budget(run)
    last_loss, last_eval = resumed_loss, None
    tokens_total, began = 0, time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    saved = start_step

    def save(done: int, loss: float | None) -> None:
        nonlocal saved
        meta = checkpoint.Meta(step=done, epoch=done / sched.steps_per_epoch,
                               data_position=done, train_loss=loss)
        checkpoint.save(output / "checkpoints", meta, stepper, ranks, run.spec.checkpoint.keep)
        saved = done

    stepper.model.train()
    try:
        for step in range(start_step, sched.total_steps):
            work = build_step(
                data.train, step, sched.steps_per_epoch, global_batch=run.plan.global_batch_size,
                seed=training.seed, world=ranks.world, rank=ranks.rank, packing=training.packing,
                token_budget=budget, micro_batch_size=run.plan.micro_batch_size, pad_id=pad_id,
            )
            loss_sum = 0.0
            for micro in work.micro_batches:
                summed = stepper.loss_sum(_to(micro, device))
                # Every target token of the step weighs the same, on any rank or micro-batch;
                # data-parallel averaging divides by the world size, so multiply it back.
                stepper.backward(summed * ranks.world / work.targets)
                loss_sum += float(summed.detach())
            grad_norm = stepper.step()
            done = step + 1
            last_loss = _global_sum(loss_sum, ranks, device) / work.targets
            tokens_total += work.tokens
            window_tokens += work.tokens
            if checkpoint_due(done, run.spec.checkpoint.every_steps, sched.total_steps):
                save(done, last_loss)
            if data.validation and (done % eval_every == 0 or done == sched.total_steps):
                last_eval = eval_loss(stepper.model, data.validation, budget, device)
                stepper.model.train()
            if done % training.log_every_steps == 0 or done == sched.total_steps:
                now = time.monotonic()
                per_step = (now - began) / (done - start_step)
                entry = {
                    "step": done, "totalSteps": sched.total_steps,
                    "epoch": round(done / sched.steps_per_epoch, 4), "loss": last_loss,
                    "lr": stepper.lr, "gradNorm": grad_norm,
                    "tokensPerSecond": round(window_tokens / max(now - window_start, 1e-9), 2),
                    "etaSeconds": round(per_step * (sched.total_steps - done)),
                    "time": time.time(),
                }
                if last_eval is not None:
                    entry["evalLoss"] = last_eval
                window_tokens, window_start = 0, now
                if ranks.is_main:
                    metrics.write(entry)
                    reporter.offer(progress_body(entry, last_eval), force=done == sched.total_steps)
                    log.info("step %d/%d loss %.4f", done, sched.total_steps, last_loss)
            # Every rank, every step: the ranks may have seen the signal at different steps.
            signum = distributed.max_over_ranks(stop.signum, ranks, device)
            if signum:
                if saved != done:
                    save(done, last_loss)
                raise Stopped(done, signal_name(signum))
            if crash_after and done == crash_after:
                os._exit(3)
    finally:
        reporter.close()
    return LoopResult(
        steps=sched.total_steps, train_loss=last_loss, eval_loss=last_eval,
        tokens=tokens_total, seconds=time.monotonic() - began,
    )
