"""The decode batch's key/value cache: one buffer per layer that is both past and present.

The GenAI builder's GroupQueryAttention accepts the same buffer as its past input and present
output (`past_present_share_buffer` in genai_config.json): it then writes each row's new key and
value in place at that row's length, which it reads from the attention-mask sum, and never
reads past it. Bound through IO binding, a decode step therefore copies no cache at all (a
separate present would copy the whole past every step) and allocates nothing: token ids, mask,
logits and the cache all live in buffers made once here.

Running sequences are packed into the first `n` rows, so a step binds contiguous prefixes of
the buffers and computes nothing for empty rows; a sequence that leaves is replaced by the last
row. The mask is as wide as the buffer, so its width (ONNX Runtime's "total sequence length")
never changes between steps either; measured, neither that width nor the buffer capacity
changes the cost of a step, which only attends to each row's own length.

On CUDA (an export built for it, `genai_model.execution_providers`) the buffers stay in host
memory: ONNX Runtime copies each bound input to the GPU and each output back, so a step
copies the bound cache both ways (GroupQueryAttention then sees two device buffers and
concatenates instead of writing in place). That is not the GPU's speed: a device-resident
cache (OrtValues on `cuda`) is the next step; tests/trainer/serve/test_cuda.py (`-m gpu`)
checks its answers against unbatched decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kubetune_trainer.serve.engines.batch.graph import POSITIONS, ROPE_LONG
from kubetune_trainer.serve.engines.batch.lora import AdapterWeights, BranchFeeds, BranchLayout

GROW = 256  # capacity grows in steps of this many positions (each growth copies the cache)


class KVCache:
    def __init__(
        self,
        session: Any,
        past_names: list[str],
        shape: tuple[int, int],  # (key/value heads, head size)
        dtype: type[np.generic],
        rows: int,
        vocab: int,
        hidden: int,
        limit: int,
        branches: BranchLayout | None,
        rope_switch: bool = False,
    ) -> None:
        self.session = session
        self.past_names = past_names
        self.present_names = [n.replace("past_key_values", "present") for n in past_names]
        self.heads, self.head_size = shape
        self.dtype = dtype
        self.rows = rows
        self.limit = limit  # the context length: the rotary caches have no more positions
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if "float16" in logits.type else np.float32
        self.vocab = vocab
        self.ids = np.zeros((rows, 1), np.int64)
        self.positions = np.zeros((rows, 1, hidden), np.int64)  # a step's one position: 0
        # Each row's LoRA adapter (None: the base), and the branches' inputs for them (`lora`);
        # none without branches. Bound until the rows' adapters change.
        self.branch_feeds = BranchFeeds(branches) if branches is not None else None
        self.row_adapters: list[AdapterWeights | None] = [None] * rows
        self.fed: dict[str, np.ndarray] = {}
        self.logits = np.zeros((rows, 1, self.vocab), self.logits_dtype)
        # A LongRoPE graph's `ROPE_LONG`: False in a decode step, where each position's rotary
        # factors follow its own sequence's length (`graph.rope_switch`).
        self.rope_long = np.zeros((), np.bool_) if rope_switch else None
        self.capacity = 0
        self.buffers: list[np.ndarray] = []
        self.mask = np.zeros((rows, 0), np.int64)
        self.binding: Any = None
        self.bound = -1  # rows the binding covers; -1: bind again before the next step
        # The rows' adapters it was bound for (compared by identity: a replaced adapter is a
        # new object, so its rows are bound afresh).
        self.bound_adapters: tuple[AdapterWeights | None, ...] = ()

    def reserve(self, used: int, capacity: int) -> None:
        """Make room for `capacity` positions per row, keeping the first `used` rows."""
        if capacity <= self.capacity:
            return
        capacity = min(-(-capacity // GROW) * GROW, max(self.limit, capacity))
        shape = (self.rows, self.heads, capacity, self.head_size)
        buffers = [np.zeros(shape, self.dtype) for _ in self.past_names]
        for new, old in zip(buffers, self.buffers, strict=False):
            new[:used, :, : self.capacity] = old[:used]
        mask = np.zeros((self.rows, capacity), np.int64)
        mask[:used, : self.capacity] = self.mask[:used]
        self.buffers, self.mask, self.capacity, self.bound = buffers, mask, capacity, -1

    def release(self) -> None:
        """Free the cache (the batch is empty); the next `reserve` sizes it afresh."""
        self.buffers, self.capacity, self.bound = [], 0, -1
        self.row_adapters = [None] * self.rows
        self.fed, self.bound_adapters = {}, ()
        if self.branch_feeds is not None:
            self.branch_feeds.forget()
        self.mask = np.zeros((self.rows, 0), np.int64)

    def store(
        self,
        row: int,
        present: list[np.ndarray],
        index: int,
        length: int,
        adapter: AdapterWeights | None,
    ) -> None:
        """Copy row `index` of a prefill's present outputs (its first `length` positions), for a
        sequence that adds LoRA adapter `adapter` (None: the base alone)."""
        for buffer, value in zip(self.buffers, present, strict=True):
            buffer[row, :, :length] = value[index, :, :length]
        self.mask[row] = 0
        self.mask[row, :length] = 1
        self.row_adapters[row] = adapter

    def move(self, source: int, target: int, length: int) -> None:
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.mask[target] = self.mask[source]
        self.row_adapters[target] = self.row_adapters[source]
        self.row_adapters[source] = None  # a replaced adapter is freed once no row holds it

    def step(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        """Decode one token for rows 0..n-1 (row r holds `lengths[r]` positions): (n, vocab)."""
        n = len(tokens)
        adapters = tuple(self.row_adapters[:n]) if self.branch_feeds else ()
        if self.bound != n or adapters != self.bound_adapters:
            self._bind(n)
            self.bound_adapters = adapters
        self.ids[:n, 0] = tokens
        self.mask[np.arange(n), lengths] = 1  # the new token's position joins the row
        self.session.run_with_iobinding(self.binding)
        return self.logits[:n, 0]

    def _bind(self, n: int) -> None:
        binding = self.session.io_binding()
        binding.bind_input("input_ids", "cpu", 0, np.int64, (n, 1), self.ids.ctypes.data)
        binding.bind_input(
            "attention_mask", "cpu", 0, np.int64, (n, self.capacity), self.mask.ctypes.data
        )
        binding.bind_input(
            POSITIONS, "cpu", 0, np.int64, (n, *self.positions.shape[1:]),
            self.positions.ctypes.data,
        )
        if self.branch_feeds is not None:
            # Kept referenced while bound: the binding holds their addresses only.
            self.fed = self.branch_feeds.feeds(self.row_adapters[:n])
            for name, value in self.fed.items():
                assert value.flags.c_contiguous, name  # bound by address: read in C order
                binding.bind_input(
                    name, "cpu", 0, value.dtype, value.shape, value.ctypes.data
                )
        if self.rope_long is not None:
            binding.bind_input(ROPE_LONG, "cpu", 0, np.bool_, (), self.rope_long.ctypes.data)
        binding.bind_output(
            "logits", "cpu", 0, self.logits_dtype, (n, 1, self.vocab), self.logits.ctypes.data
        )
        shape = (n, self.heads, self.capacity, self.head_size)
        for past, present, buffer in zip(
            self.past_names, self.present_names, self.buffers, strict=True
        ):
            binding.bind_input(past, "cpu", 0, self.dtype, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, self.dtype, shape, buffer.ctypes.data)
        self.binding, self.bound = binding, n
