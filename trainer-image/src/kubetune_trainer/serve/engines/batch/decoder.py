"""The exported decoder as the batching engine runs it: its ONNX Runtime session, the names,
shape and type of its key/value inputs, and prompt (prefill) runs.

Separate from the scheduler (`scheduler`), which decides who runs when, because this is what
the GenAI builder's export looks like to ONNX Runtime; decode steps run through the batch cache
(`kv.KVCache`), which this sets up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kubetune_trainer.genai_model import DecoderLayout, kv_dtype
from kubetune_trainer.serve.adapters import read_adapter
from kubetune_trainer.serve.engines.batch.graph import (
    POSITIONS,
    ROPE_LONG,
    positions,
    serving_session,
)
from kubetune_trainer.serve.engines.batch.kv import KVCache
from kubetune_trainer.serve.engines.batch.lora import (
    AdapterWeights,
    BranchDesign,
    BranchFeeds,
    adapter_weights,
)

log = logging.getLogger(__name__)

class Decoder:
    def __init__(
        self, model_dir: Path, lora: bool = False, design: BranchDesign | None = None
    ) -> None:
        """`lora`: the graph gets LoRA branches, fed for each run's adapters (`lora`), computed
        as `design` says (None: the best this machine runs, `graph.branch_design`)."""
        layout = DecoderLayout.read(model_dir)
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.hidden = int(config["hidden_size"])
        # Logits at one position per row (`graph`); with `lora`, a branch on every decoder
        # MatMul and their layout (`self.branches`).
        # `rope_switch`: where a LongRoPE graph's rotary caches switch to the long factors
        # (None: one cache); a prompt longer than that is prefilled alone
        # (`scheduler.prefill_groups`), with the long factors throughout (`graph.rope_switch`).
        self.session, self.branches, self.rope_switch = serving_session(
            layout, config, lora, design
        )
        self.prefill_feeds = BranchFeeds(self.branches) if self.branches else None
        if self.branches is not None:
            log.info(
                "LoRA branches: %s, A and B in %s",
                "one LoraBranch kernel node each"
                if self.branches.design.fused
                else "four ONNX nodes each",
                np.dtype(self.branches.weights).name,
            )
        self.kv_shape = layout.kv_shape
        self.kv_dtype = kv_dtype(self.session)
        self.kv_names = layout.kv_names
        self.output_names = layout.output_names
        self.vocab = layout.vocab

    def read_adapter(self, name: str, path: Path) -> AdapterWeights:
        """A PEFT LoRA adapter directory as this graph's branches are fed it; refused
        (`AdapterError`) by name when it cannot be served on this base."""
        if self.branches is None:
            raise ValueError("this decoder was built without LoRA branches")
        return adapter_weights(read_adapter(name, path, self.hidden), self.branches)

    def batch_cache(self, rows: int, context_length: int) -> KVCache:
        """The decode batch's cache: `rows` sequences of up to `context_length` positions."""
        return KVCache(
            self.session,
            self.kv_names,
            self.kv_shape,
            self.kv_dtype,
            rows,
            self.vocab,
            self.hidden,
            context_length,
            self.branches,
            self.rope_switch is not None,
        )

    def prefill(
        self,
        prompts: list[list[int]],
        adapters: list[AdapterWeights | None],
        tokens_per_run: int,
        logits_dtype: type[np.generic],
        progress: Callable[[], None] = lambda: None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the prompts (`adapters`: each one's LoRA adapter, None for the base): each row's
        last logits, and the present key/values; `progress()` after each run (the engine's
        heartbeat: a long prompt is progress, not a stall).

        At most `tokens_per_run` padded tokens go through one run. `scheduler.prefill_groups`
        keeps a group of several prompts within that, so only a prompt alone can take several
        runs: chunks whose past is the previous chunk's present (exactly what one run computes).
        """
        width = max(len(prompt) for prompt in prompts)
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        heads, size = self.kv_shape
        present = [np.zeros((len(prompts), heads, 0, size), self.kv_dtype)] * len(self.kv_names)
        last = np.zeros((len(prompts), self.vocab), logits_dtype)
        chunk = max(1, tokens_per_run // len(prompts))
        selected = self.prefill_feeds.feeds(adapters) if self.prefill_feeds else {}
        if self.rope_switch is not None:
            long = {len(prompt) > self.rope_switch for prompt in prompts}
            if len(long) > 1:
                raise ValueError("a prefill group mixes prompts on both sides of the RoPE switch")
            selected[ROPE_LONG] = np.array(long.pop())
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            # Each row's logits at its last prompt token if it is in this chunk (else unused).
            chosen = [min(max(len(p) - 1 - start, 0), end - start - 1) for p in prompts]
            feeds = {
                "input_ids": ids[:, start:end],
                "attention_mask": mask[:, :end],
                POSITIONS: positions(len(prompts), self.hidden, chosen),
                **dict(zip(self.kv_names, present, strict=True)),
                **selected,
            }
            logits, *present = self.session.run(self.output_names, feeds)
            progress()
            for row, prompt in enumerate(prompts):
                if start < len(prompt) <= end:
                    last[row] = logits[row, 0]
        if self.prefill_feeds is not None:
            self.prefill_feeds.forget()  # held by the group's sequences from here on
        return last, present
