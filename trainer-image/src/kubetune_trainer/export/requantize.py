"""INT4 weights rounded by GPTQ on calibration tokens (`quantization: GPTQ`).

The builder's RTN export has the CPU's fastest layout for one-row decode steps: 4-bit
MatMulNBits in blocks of 32 with int8 activations (bench/kernels.py: an 8-bit output head takes
1.4x as long), but its rounding costs the quickstart model 17 points of exact match. This keeps
RTN's graph, bytes, kernel and speed and re-rounds every MatMulNBits' weights from the FP32
model by GPTQ (Frantar et al., 2022): the columns of each weight are rounded in order and each
rounding error is spread over the columns not yet rounded, weighted by how the calibration
activations correlate them, so each layer's output on those activations moves as little as it
can. Calibration is the first training records
(`kubetune_trainer.heldout.Calibration`), never the held-out ones `precision: Auto` scores on.

Each node's FP32 weight is found by structure, not by a family's module names
(`WeightFinder`): the builder names a node after its decoder layer (`/model/layers.3/...`), and
the weight is the run of rows, among that layer's linear layers taken in the model's own order,
that the node's RTN weight is a rounding of (dequantized RTN lies within one scale step of the
FP32 weight). That finds Llama's q/k/v stacked into one qkv_proj node, Phi-3's packed qkv_proj
whole and its gate_up_proj split into gate and up nodes, and a head tied to the embedding; and
the check is the one that keeps a layout this does not know from serving a scrambled model:
a node whose weight is nobody's rounding fails loudly. The calibration activations of a node
are the input of the linear layer(s) it came from; rows stacked from several must read one input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32
LAYER_INDEX = re.compile(r"/layers\.(\d+)/")
"""The builder's name for a node inside decoder layer N: `/model/layers.N/attn/.../MatMul`."""
TIED_EMBEDDING = {"MatMulNBits", "Reshape", "GatherBlockQuantized"}
"""What may read a node's weights besides itself: the embedding lookup of a head tied to the
embedding, which the builder points at the head's 4-bit table. Re-rounding the head re-rounds
that table too: GPTQ's values are a rounding of the same FP32 weights, chosen for the head's
outputs (as every GPTQ export of the built-in SmolLM2, whose head is tied, has been)."""
SCAN_ROWS = 4096
"""Rows compared at a time when a node's weight starts inside a linear layer (a split pack)."""


@dataclass(frozen=True)
class Part:
    module: str
    """The linear layer's name in the model (`named_modules`)."""
    rows: tuple[int, int]
    """The rows of its weight [start, stop)."""


@dataclass(frozen=True)
class Source:
    """Where a MatMulNBits node's weight lies in the transformers model: rows of one or more
    linear layers, stacked in order."""

    parts: tuple[Part, ...]

    @property
    def reads(self) -> str:
        """The module whose input the node reads (every part's must be the same)."""
        return self.parts[0].module


def _decoder_layers(model: Any) -> tuple[str, int]:
    """The name and length of the model's stack of decoder layers: the ModuleList as long as
    the config's `num_hidden_layers`."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else (
        model.config)
    count = int(config.num_hidden_layers)
    stacks = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if len(stacks) != 1:
        raise ValueError(f"cannot tell the decoder layers apart: ModuleLists of {count} "
                         f"layers: {stacks}")
    return stacks[0], count


class WeightFinder:
    """Each MatMulNBits node's FP32 weight in a loaded transformers model, found by structure."""

    def __init__(self, model: Any) -> None:
        import torch

        self.modules: dict[str, Any] = dict(model.named_modules())
        stack, count = _decoder_layers(model)
        self.pools: dict[int | None, list[tuple[str, np.ndarray]]] = {
            index: [] for index in range(count)}
        self.pools[None] = []
        self.arrays: dict[str, np.ndarray] = {}
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = self.arrays[name] = module.weight.detach().float().numpy()
            inside = name.removeprefix(f"{stack}.") if name.startswith(f"{stack}.") else None
            index = None if inside is None else int(inside.split(".", 1)[0])
            self.pools[index].append((name, weight))

    def weight(self, source: Source) -> np.ndarray:
        return np.concatenate([self.arrays[p.module][p.rows[0]:p.rows[1]]
                               for p in source.parts])

    def find(self, node: str, rtn: np.ndarray, scales: np.ndarray) -> Source:
        """The rows whose rounding `rtn` (N, K) is, each element within its block's scale
        (`scales`, (N, K/32)), among the linear layers of the node's decoder layer (or, for a
        node outside them such as the head, those outside). Runs that start where a linear
        layer starts are tried first; a node that starts inside one (the second half of a
        packed gate_up_proj) is found by scanning its rows."""
        match = LAYER_INDEX.search(node)
        index = int(match.group(1)) if match else None
        if index not in self.pools:
            raise ValueError(f"{node}: the model has no decoder layer {index}")
        columns = rtn.shape[1]
        pool = [(name, w) for name, w in self.pools[index] if w.shape[1] == columns]
        bound = np.abs(scales).repeat(BLOCK, axis=1)[:, :columns] + 1e-6
        found: list[tuple[Part, ...]] = []
        for scan in (False, True):
            for position, (_, weight) in enumerate(pool):
                for start in self._starts(weight, rtn[0], bound[0], scan):
                    parts = self._run(pool, position, start, rtn, bound)
                    if parts is not None and parts not in found:
                        found.append(parts)
            if found:
                break
        if not found:
            raise ValueError(f"{node}: its weights are not a rounding of any of the model's "
                             f"linear weights of {columns} inputs in that layer")
        if len(found) > 1:
            raise ValueError(f"{node}: more than one of the model's weights rounds to it: "
                             f"{found}")
        return Source(found[0])

    @staticmethod
    def _starts(weight: np.ndarray, first: np.ndarray, bound: np.ndarray,
                scan: bool) -> list[int]:
        """The rows of `weight` that `first` (the node's first row) is a rounding of: row 0
        alone, or (`scan`) every other row."""
        if not scan:
            return [0] if np.all(np.abs(weight[0] - first) <= bound) else []
        starts: list[int] = []
        for offset in range(0, weight.shape[0], SCAN_ROWS):
            block = weight[offset:offset + SCAN_ROWS]
            hits = np.flatnonzero(np.all(np.abs(block - first) <= bound, axis=1))
            starts.extend(int(offset + h) for h in hits if offset + h > 0)
        return starts

    @staticmethod
    def _run(pool: list[tuple[str, np.ndarray]], position: int, start: int, rtn: np.ndarray,
             bound: np.ndarray) -> tuple[Part, ...] | None:
        """The parts, from row `start` of pool[position] on through the next linear layers,
        that `rtn` is a rounding of; None when it is not."""
        parts: list[Part] = []
        done = 0
        while done < rtn.shape[0]:
            if position >= len(pool):
                return None
            name, weight = pool[position]
            take = min(weight.shape[0] - start, rtn.shape[0] - done)
            if np.any(np.abs(weight[start:start + take] - rtn[done:done + take])
                      > bound[done:done + take]):
                return None
            parts.append(Part(name, (start, start + take)))
            done += take
            position, start = position + 1, 0
        return tuple(parts)


def hessians(model: Any, sources: Iterable[Source], sequences: Iterable[list[int]],
             modules: dict[str, Any]) -> dict[str, Any]:
    """Per module a node reads (`Source.reads`), the mean outer product X^T X / n (a torch
    tensor, K x K) of the activations that reach it over `sequences`: GPTQ's proxy for how
    each input direction matters. Rows stacked from several modules must see one input."""
    import torch

    sources = list(sources)
    read = {source.reads for source in sources}
    siblings = {(source.reads, part.module) for source in sources for part in source.parts
                if part.module != source.reads}
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    seen: dict[str, Any] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(_: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            seen[name] = x
            if name in read:
                flat = x.double().reshape(-1, x.shape[-1])
                sums[name] = sums.get(name, 0) + flat.T @ flat
                counts[name] = counts.get(name, 0) + flat.shape[0]
        return record

    for name in read | {module for _, module in siblings}:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.inference_mode():
            for ids in sequences:
                seen.clear()
                model(input_ids=torch.tensor([ids]))
                for reads, sibling in siblings:
                    if not torch.equal(seen[reads], seen[sibling]):
                        raise ValueError(f"rows stacked from {reads} and {sibling} into one "
                                         "MatMul, but the two read different inputs")
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


DAMPING = 0.01
"""Added to the Hessian's diagonal, times its mean: GPTQ's usual regularisation."""
COLUMNS_PER_PASS = 128


def gptq(weight: np.ndarray, hessian: Any) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks of (N, K) `weight` by GPTQ (Frantar et al., 2022): columns are
    rounded in order and each one's rounding error is spread over the columns not yet rounded,
    in proportion to how the calibration activations correlate them, so the layer's output
    on those activations moves as little as it can. Each block's scale is RTN's, taken from
    the block's weights as updated when the block is reached. Returns (B, scales)."""
    import torch

    work = torch.tensor(weight, dtype=torch.float32)
    rows, columns = work.shape
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h += torch.eye(columns, dtype=torch.float64) * DAMPING * torch.mean(torch.diag(h))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                  upper=True).float()
    values = torch.zeros((rows, columns), dtype=torch.float32)
    scales = torch.zeros((rows, columns // BLOCK), dtype=torch.float32)
    for first in range(0, columns, COLUMNS_PER_PASS):
        last = min(first + COLUMNS_PER_PASS, columns)
        part = work[:, first:last].clone()
        errors = torch.zeros_like(part)
        inverse = upper[first:last, first:last]
        for offset in range(last - first):
            column = first + offset
            if column % BLOCK == 0:
                block = part[:, offset : offset + BLOCK]
                pivot = block.gather(1, block.abs().argmax(dim=1, keepdim=True))[:, 0]
                scale = pivot / -8.0
                scales[:, column // BLOCK] = scale
            scale = scales[:, column // BLOCK]
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            rounded = torch.clamp(torch.round(part[:, offset] / safe), -8, 7)
            values[:, column] = rounded
            error = (part[:, offset] - rounded * scale) / inverse[offset, offset]
            part[:, offset:] -= error[:, None] * inverse[offset, offset:][None, :]
            errors[:, offset] = error
        work[:, last:] -= errors @ upper[first:last, last:]
    stored = (values + 8).to(torch.uint8).numpy().reshape(rows, columns // BLOCK, BLOCK)
    packed = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return packed, scales.float().numpy()


def dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, K) weights of a symmetric 4-bit MatMulNBits: B (N, K/32, 16), scales (N, K/32)."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    values = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], BLOCK)
    return (values * scales[..., None]).reshape(packed.shape[0], -1)


def output_error(delta: np.ndarray, hessian: Any) -> float:
    """How far a weight error moves the layer's outputs on the calibration activations:
    trace(delta H delta^T)."""
    h = hessian.float().numpy()
    return float(((delta @ h) * delta).sum())


def requantize(onnx_dir: Path, model: Any, sequences: list[list[int]]) -> float:
    """Re-round every 4-bit MatMulNBits of the RTN export in `onnx_dir` in place, by GPTQ on
    `sequences`; returns the layers' summed output error on them relative to RTN's (below 1:
    closer to FP32 than RTN)."""
    if not sequences:
        raise ValueError("GPTQ needs calibration tokens")
    import onnx
    from onnx import numpy_helper

    path = onnx_dir / "model.onnx"
    graph_model = onnx.load(str(path), load_external_data=True)
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    finder = WeightFinder(model)
    found: list[tuple[Any, Source, np.ndarray]] = []  # (node, source, its RTN weight)
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (attributes.get("bits"), attributes.get("block_size"), len(node.input)) != (4, BLOCK, 3):
            raise ValueError(f"{node.name}: not a symmetric 4-bit block-32 MatMulNBits")
        if attributes.get("K", 0) % BLOCK:
            raise ValueError(f"{node.name}: {attributes.get('K')} inputs are not whole blocks")
        if any(readers[name] - TIED_EMBEDDING for name in node.input[1:]):
            raise ValueError(f"{node.name}: its weights are shared with another node")
        packed = numpy_helper.to_array(initializers[node.input[1]])
        scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(packed.shape[0], -1)
        rtn = dequantize(packed, scales)
        found.append((node, finder.find(node.name, rtn, scales), rtn))
    correlations = hessians(model, [source for _, source, _ in found], sequences,
                            finder.modules)
    rtn_error = gptq_error = 0.0
    for node, source, rtn in found:
        packed_init, scale_init = initializers[node.input[1]], initializers[node.input[2]]
        weight = finder.weight(source)
        hessian = correlations[source.reads]
        new_packed, new_scales = gptq(weight, hessian)
        rtn_error += output_error(rtn - weight, hessian)
        gptq_error += output_error(dequantize(new_packed, new_scales) - weight, hessian)
        shape = numpy_helper.to_array(packed_init).shape
        packed_init.CopyFrom(numpy_helper.from_array(new_packed.reshape(shape), packed_init.name))
        scale_init.CopyFrom(numpy_helper.from_array(
            new_scales.reshape(numpy_helper.to_array(scale_init).shape), scale_init.name))
    data = path.with_name("model.onnx.data")
    # onnx appends external tensors to an existing file: the old bytes go first (all loaded).
    data.unlink(missing_ok=True)
    onnx.save_model(graph_model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    return gptq_error / max(rtn_error, 1e-30)
