"""Where a decode step's time goes on this CPU: ONNX Runtime's weight kernels on the built-in
model's output head (49,152 x 576, the largest matrix), one row (single-stream decoding) and
eight rows (eight streams batched), in one run.

    python bench/kernels.py [--rows 1,8] [--repeats 20]

Kernels: MatMulNBits (4-bit and 8-bit blocks of 32, with and without zero points, int8
activations = accuracy_level 4, what the exports use), DynamicQuantizeMatMul (int8 weights per
output channel, int8 activations: ONNX Runtime's dynamic quantization) and a plain FP32 MatMul.
Random weights: the time depends on shapes and formats, not values. Prints milliseconds per
call (best of 5 rounds) and, per kernel, how much of the one-row time each extra row costs. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from inference import machine
from onnx import TensorProto, helper, numpy_helper

OUT, IN, BLOCK = 49152, 576, 32


def session(nodes: list[helper.NodeProto], weights: list[np.ndarray],
            names: list[str]) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, OUT])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def matmul_nbits(bits: int, zero_points: bool) -> ort.InferenceSession:
    generator = np.random.default_rng(0)
    blocks = IN // BLOCK
    weights = [generator.integers(0, 256, (OUT, blocks, BLOCK * bits // 8), dtype=np.uint8),
               generator.random((OUT, blocks), dtype=np.float32) * 0.01]
    names = ["b", "scales"]
    if zero_points:
        columns = blocks if bits == 8 else (blocks + 1) // 2
        weights.append(np.full((OUT, columns), 128 if bits == 8 else 0x88, np.uint8))
        names.append("zero_points")
    node = helper.make_node("MatMulNBits", ["x", *names], ["y"], domain="com.microsoft",
                            K=IN, N=OUT, bits=bits, block_size=BLOCK, accuracy_level=4)
    return session([node], weights, names)


def dynamic_int8() -> ort.InferenceSession:
    generator = np.random.default_rng(0)
    weights = [generator.integers(-127, 128, (IN, OUT), dtype=np.int8),
               generator.random(OUT, dtype=np.float32) * 0.01]
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale"], ["y"],
                            domain="com.microsoft")
    return session([node], weights, ["w", "scale"])


def fp32() -> ort.InferenceSession:
    weight = np.random.default_rng(0).random((IN, OUT), dtype=np.float32)
    return session([helper.make_node("MatMul", ["x", "w"], ["y"])], [weight], ["w"])


KERNELS: dict[str, Callable[[], ort.InferenceSession]] = {
    "MatMulNBits 4-bit": lambda: matmul_nbits(4, False),
    "MatMulNBits 4-bit + zero points": lambda: matmul_nbits(4, True),
    "MatMulNBits 8-bit": lambda: matmul_nbits(8, False),
    "MatMulNBits 8-bit + zero points": lambda: matmul_nbits(8, True),
    "DynamicQuantizeMatMul int8": dynamic_int8,
    "MatMul FP32": fp32,
}


def milliseconds(run: ort.InferenceSession, rows: int, repeats: int) -> float:
    x = np.random.default_rng(1).random((rows, IN), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        run.run(None, {"x": x})
        started = time.perf_counter()
        for _ in range(repeats):
            run.run(None, {"x": x})
        best = min(best, (time.perf_counter() - started) / repeats * 1e3)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(machine())
    print(f"onnxruntime {ort.__version__}; output head {OUT} x {IN}; ms per call, best of 5")
    print(f"{'kernel':34}" + "".join(f"{f'{r} row(s)':>11}" for r in rows)
          + f"{'x per row':>11}")
    for name, build in KERNELS.items():
        run = build()
        times = [milliseconds(run, r, args.repeats) for r in rows]
        # 1.0: each extra row costs a whole one-row call (batching gains nothing)
        per_row = (times[-1] / times[0] - 1) / (rows[-1] - rows[0]) if len(rows) > 1 else 0
        print(f"{name:34}" + "".join(f"{t:11.3f}" for t in times) + f"{per_row:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
