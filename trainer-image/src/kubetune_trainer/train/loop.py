"""The optimizer-step loop: micro-batches, logging, periodic evaluation, checkpoints."""

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
from kubetune_trainer.train import checkpoint
from kubetune_trainer.train.distributed import Ranks
from kubetune_trainer.train.evaluate import eval_loss
from kubetune_trainer.train.microbatches import build_step
from kubetune_trainer.train.prepare import PreparedData
from kubetune_trainer.train.report import MetricsLog, Reporter, progress_body
from kubetune_trainer.train.stepper import Stepper

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


def run_steps(run: RunConfig, data: PreparedData, stepper: Stepper, ranks: Ranks,
              device: torch.device, output: Path, start_step: int, pad_id: int) -> LoopResult:
    training, sched = run.spec.training, data.schedule
    metrics = MetricsLog(output / "metrics.jsonl")
    reporter = Reporter.from_env() if ranks.is_main else Reporter(None, None, 0)
    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    eval_every = training.eval_every_steps or sched.steps_per_epoch
    budget = token_budget(run)
    last_loss = last_eval = None
    tokens_total, began = 0, time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
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
            if done % run.spec.checkpoint.every_steps == 0 and done < sched.total_steps:
                meta = {"step": done, "epoch": done / sched.steps_per_epoch, "dataPosition": done,
                        "trainLoss": last_loss}
                checkpoint.save(output / "checkpoints", done, meta, stepper, ranks,
                                run.spec.checkpoint.keep)
            if crash_after and done == crash_after:
                os._exit(3)
    finally:
        reporter.close()
    return LoopResult(
        steps=sched.total_steps, train_loss=last_loss, eval_loss=last_eval,
        tokens=tokens_total, seconds=time.monotonic() - began,
    )
