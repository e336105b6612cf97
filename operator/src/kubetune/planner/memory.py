"""The planner's memory model: estimated peak memory of one GPU for a training setup (pure).

Kept apart from the plan search so the formula, with its measured constants, reads on its own
and can be checked against measurements without the search around it.

Memory model per GPU (performance.md section 3), in bytes:

- frozen base weights: 2 B/param in bf16, ~0.56 B/param in NF4 (QLoRA, absmax included);
- trained parameters: mixed-precision Adam, 16 B/param = bf16 weight 2 + bf16 grad 2 +
  fp32 master weight, momentum and variance 12;
- ZeRO partitions across the world size: stage 1 the optimizer states, stage 2 also the
  gradients, stage 3 also the parameters (frozen ones included). CPU offload moves the
  optimizer states (and at stage 3 the parameters) to host memory; stage 3 keeps the layers
  being gathered on the GPU;
- activations: micro-batch x sequence x layers x hidden x a per-method factor measured on
  the Llama architecture with SDPA (saved-tensor bytes of SmolLM2 in bf16: full 43 h,
  LoRA 65 h, LoRA with dropout 99 h, DoRA 177 h per token and layer, linear in the
  sequence length). Gradient checkpointing keeps only each layer's bf16 input (2 h) plus
  one layer being recomputed;
- logits: micro-batch x sequence x vocabulary x 4 B (the fp32 logits the loss keeps);
- CUDA context and workspaces (1 GiB) and 5 % allocator slack on what comes and goes.
"""

from __future__ import annotations

from kubetune.api.dataplane import HEAD_CHUNK_ROWS
from kubetune.api.spec import Method
from kubetune.planner.deepspeed import STAGE3_MAX_LIVE_PARAMETERS
from kubetune.planner.shapes import ModelShape

GIB = 1024**3
CUDA_OVERHEAD_GIB = 1.0
ALLOCATOR_SLACK = 0.05
BASE_BYTES = {"bf16": 2.0, "nf4": 0.56}
# Mixed-precision Adam: bf16 weight, bf16 gradient, fp32 master + momentum + variance.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2.0, 2.0, 12.0
LOGIT_BYTES = 4.0
CHECKPOINT_BYTES_PER_HIDDEN = 2.0
# DoRA also keeps weight-sized tensors for the column norms (~8 B per frozen linear weight).
DORA_WEIGHT_BYTES = 8.0
# ZeRO-3 holds the layer being computed and the one being prefetched, in full, up to
# `stage3_max_live_parameters` (DeepSpeed's default, written by kubetune.planner.deepspeed).
ZERO3_LIVE_LAYERS = 2


# Saved-activation bytes per token and layer as a multiple of the hidden size: (GPU in bf16,
# CPU in fp32). Both measured; see this docstring and the CPU section below.
ACTIVATION_BYTES_PER_HIDDEN = {
    "full": (44.0, 82.0),
    "dora": (180.0, 210.0),
    "lora with dropout": (100.0, 83.0),
    "lora": (66.0, 74.0),
}


def activation_bytes_per_hidden(method: Method, lora_dropout: float, cpu: bool = False) -> float:
    """Saved-activation bytes per token and layer, as a multiple of the hidden size."""
    if method is Method.FULL:
        kind = "full"
    elif method is Method.DORA:
        kind = "dora"
    else:
        kind = "lora with dropout" if lora_dropout > 0 else "lora"
    gpu_bytes, cpu_bytes = ACTIVATION_BYTES_PER_HIDDEN[kind]
    return cpu_bytes if cpu else gpu_bytes


def estimate_memory_gib(
    shape: ModelShape,
    *,
    method: Method,
    trainable: int,
    zero_stage: int,
    offload: bool,
    world_size: int,
    micro_batch: int,
    seq_length: int,
    gradient_checkpointing: bool,
    lora_dropout: float = 0.05,
) -> float:
    """Estimated peak memory of one GPU in GiB (see the module docstring)."""
    base_bytes = BASE_BYTES["nf4" if method is Method.QLORA else "bf16"]
    frozen = 0 if method is Method.FULL else shape.parameters
    shards = max(world_size, 1)

    def shard(nbytes: float, from_stage: int) -> float:
        return nbytes / shards if zero_stage >= from_stage else nbytes

    weights = frozen * base_bytes + trainable * WEIGHT_BYTES
    weights = 0.0 if offload and zero_stage >= 3 else shard(weights, 3)
    grads = shard(trainable * GRAD_BYTES, 2)
    optimizer = 0.0 if offload else shard(trainable * OPTIMIZER_BYTES, 1)
    live = 0.0
    if zero_stage >= 3 and (shards > 1 or offload):
        gathered = min(ZERO3_LIVE_LAYERS * shape.layer_parameters, STAGE3_MAX_LIVE_PARAMETERS)
        live = gathered * base_bytes

    tokens = micro_batch * seq_length
    per_layer = activation_bytes_per_hidden(method, lora_dropout) * tokens * shape.hidden
    if method is Method.DORA:
        per_layer += DORA_WEIGHT_BYTES * shape.linear_parameters_per_layer
    if gradient_checkpointing:
        checkpoints = CHECKPOINT_BYTES_PER_HIDDEN * tokens * shape.hidden * shape.layers
        activations = checkpoints + per_layer
    else:
        activations = per_layer * shape.layers
    logits = tokens * shape.vocab * LOGIT_BYTES
    transient = (activations + logits) * (1 + ALLOCATOR_SLACK)
    return (weights + grads + optimizer + live + transient) / GIB + CUDA_OVERHEAD_GIB


# --- CPU runs: the resident memory of one training process, all in fp32 ---------------------
#
# Measured on the built-in SmolLM2-135M with `bench/train_memory.py` (2-core AMD EPYC, torch
# 2.15, tcmalloc; 760-803-token packed micro-batches), and checked against the whole run's
# peak by `bench/train_throughput.py`:
# - the runtime (Python, torch, transformers, peft, DeepSpeed imported): 0.75 GiB;
# - weights 4 B/param (the fp32 safetensors pages are all touched by the first forward);
#   trained parameters add an fp32 gradient and AdamW's two moments (12 B/param);
# - saved activations per token and layer, as bytes per hidden unit: LoRA with dropout 83
#   (its dropout keeps a mask, kubetune_trainer/train/lean_lora.py), LoRA without 74, full
#   fine-tuning 82, DoRA 210; with gradient checkpointing only each layer's fp32 input (4);
# - the output head runs in chunks of `HEAD_CHUNK_ROWS` target positions
#   (kubetune_trainer/train/chunked_loss.py): one chunk's fp32 logits and its softmax
#   gradient (2 x 4 B x vocabulary per row) at a time.
CPU_RUNTIME_GIB = 0.75
CPU_WEIGHT_BYTES = 4.0
CPU_TRAINED_EXTRA_BYTES = 12.0
CPU_HEAD_BYTES_PER_VOCAB = 8.0
CPU_CHECKPOINT_BYTES_PER_HIDDEN = 4.0


def estimate_host_memory_gib(
    shape: ModelShape,
    *,
    method: Method,
    trainable: int,
    zero_stage: int,
    world_size: int,
    tokens: int,
    gradient_checkpointing: bool,
    lora_dropout: float = 0.05,
) -> float:
    """Estimated peak resident memory of one CPU training process in GiB, for micro-batches
    of at most `tokens` tokens (packed rows: micro-batch x maxSeqLength)."""
    shards = max(world_size, 1)
    frozen = 0 if method is Method.FULL else shape.parameters
    if method is Method.QLORA:
        # NF4 linear weights; the embedding table (tied to the output head) stays fp32.
        embedding = shape.vocab * shape.hidden
        weights = (frozen - embedding) * BASE_BYTES["nf4"] + embedding * CPU_WEIGHT_BYTES
    else:
        weights = frozen * CPU_WEIGHT_BYTES
    weights += trainable * CPU_WEIGHT_BYTES
    grads = trainable * 4.0 / (shards if zero_stage >= 2 else 1)
    moments = trainable * (CPU_TRAINED_EXTRA_BYTES - 4.0) / (shards if zero_stage >= 1 else 1)
    per_layer = activation_bytes_per_hidden(method, lora_dropout, cpu=True) * tokens * shape.hidden
    if gradient_checkpointing:
        layer_inputs = CPU_CHECKPOINT_BYTES_PER_HIDDEN * tokens * shape.hidden * shape.layers
        activations = layer_inputs + per_layer
    else:
        activations = per_layer * shape.layers
    head = CPU_HEAD_BYTES_PER_VOCAB * min(tokens, HEAD_CHUNK_ROWS) * shape.vocab
    return CPU_RUNTIME_GIB + (weights + grads + moments + activations + head) / GIB
