"""Where a KubeTune training step's memory goes: a profile per phase and per kind of tensor.

    python bench/train_memory.py [--micro-batch 2] [--max-len 512] [--records 48]
        [--packing/--no-packing] [--dropout 0.05] [--checkpointing]

Runs the trainer's own pieces (model loading, the adapter, `build_step`, the stepper) on the
bench's generated chat data (`bench/train_throughput.py`'s generator) and prints:
- the process RSS after each phase (imports, base model, adapter, each micro-batch's forward
  and backward, the optimizer step);
- the bytes autograd saves for the backward pass during one micro-batch's forward, grouped by
  what saved them (attention, MLP, norms, LoRA dropout and adapters, the output head and loss),
  per token and layer as a multiple of the hidden size: the figure the planner's memory model
  (`kubetune.planner.memory`) uses.
Saved tensors are counted once per storage, and parameters (which autograd also references)
are left out. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def category(module_path: str) -> str:
    """What a saved tensor belongs to, from the innermost module that was running."""
    if "lora_" in module_path or "lora_dropout" in module_path:
        return "LoRA (dropout copies, adapter inputs)"
    if "self_attn" in module_path:
        return "attention (projections, rope, SDPA)"
    if "mlp" in module_path:
        return "MLP (gate, up, SiLU, down)"
    if "norm" in module_path:
        return "RMSNorm"
    if "lm_head" in module_path or module_path == "<loss>":
        return "output head, logits and loss"
    return "other (embeddings, residual adds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dropout", default="0.05")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--method", default="LoRA", choices=["LoRA", "DoRA", "QLoRA", "Full"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = rss_mib()
    import torch
    from train_throughput import dataset
    from transformers import AutoTokenizer

    from kubetune.api import RunConfig
    from kubetune_trainer import sources
    from kubetune_trainer.builtin import builtin_model_dir
    from kubetune_trainer.train import model as models
    from kubetune_trainer.train.data import load_examples
    from kubetune_trainer.train.encoding import encode
    from kubetune_trainer.train.loop import token_budget
    from kubetune_trainer.train.microbatches import build_step
    from kubetune_trainer.train.stepper import TorchStepper

    phases: list[tuple[str, float]] = [("python", start), ("imports", rss_mib())]
    work = Path(tempfile.mkdtemp(prefix="kubetune-memory-"))
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m-instruct"))
    dataset(work / "data.jsonl", args.records, 16, args.max_len, tokenizer)
    run = RunConfig.model_validate({
        "name": "memory",
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": f"file://{work / 'data.jsonl'}", "format": "Chat"},
            "method": args.method,
            **({} if args.method == "Full" else
               {"lora": {"rank": 16, "alpha": 32, "dropout": args.dropout}}),
            "training": {"batchSize": args.batch, "maxSeqLength": args.max_len,
                         "packing": args.packing,
                         "gradientCheckpointing": args.checkpointing},
            "resources": {"gpusPerNode": 0},
        },
        "plan": {"worldSize": 1, "zeroStage": 0, "microBatchSize": args.micro_batch,
                 "gradientAccumulationSteps": args.batch // args.micro_batch,
                 "globalBatchSize": args.batch, "estimatedGpuMemoryGiB": "0"},
    })
    _, examples = load_examples(work / "data.jsonl", "Chat")
    data = [encode(tokenizer, e, args.max_len) for e in examples]
    location = sources.resolve_model(run.spec.model.source, None)
    base = models.load_base(location, run.spec, quantized=args.method == "QLoRA")
    phases.append(("base model loaded (fp32)", rss_mib()))
    model = models.prepare(base, run.spec)
    phases.append(("adapter attached", rss_mib()))
    device = torch.device("cpu")
    stepper = TorchStepper(model, run.spec.training, 10, device)
    model.train()
    parameters = {p.data_ptr() for p in model.parameters()}

    stack: list[str] = []
    saved: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def enter(name: str) -> Any:
        def hook(module: Any, inputs: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: Any, inputs: Any, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        module.register_forward_pre_hook(enter(name))
        module.register_forward_hook(leave)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in parameters and key not in seen:
            seen.add(key)
            saved[category(stack[-1] if stack else "<loss>")] += storage.nbytes()
        return tensor

    step = build_step(data, 0, len(data) // args.batch, global_batch=args.batch, seed=42, world=1,
                      rank=0, packing=args.packing, token_budget=token_budget(run),
                      micro_batch_size=args.micro_batch, pad_id=tokenizer.pad_token_id)
    tokens_first = int(step.micro_batches[0]["input_ids"].numel())
    began = time.perf_counter()
    for index, micro in enumerate(step.micro_batches):
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = stepper.loss_sum(micro)
        phases.append((f"micro-batch {index}: forward ({micro['input_ids'].numel()} tokens)",
                       rss_mib()))
        stepper.backward(loss / step.targets)
        phases.append((f"micro-batch {index}: backward", rss_mib()))
        if index == 0:
            first = dict(saved)
    stepper.step()
    seconds = time.perf_counter() - began
    phases.append(("optimizer step", rss_mib()))

    print(f"{'phase':55s} {'RSS MiB':>9s}")
    for name, value in phases:
        print(f"{name:55s} {value:9.0f}")
    print(f"{'peak RSS (ru_maxrss)':55s} {peak_mib():9.0f}")
    print(f"step: {step.tokens} tokens in {seconds:.1f} s ({step.tokens / seconds:.0f} tokens/s, "
          "with the saved-tensor hooks on)")
    config = base.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    total = sum(first.values())
    print(f"\nsaved for backward in micro-batch 0 ({tokens_first} tokens): {total / 2**20:.0f} MiB")
    print(f"{'kind':42s} {'MiB':>7s} {'x hidden per token-layer':>26s}")
    for kind, nbytes in sorted(first.items(), key=lambda kv: -kv[1]):
        print(f"{kind:42s} {nbytes / 2**20:7.0f} {nbytes / (tokens_first * layers * hidden):26.1f}")
    print(f"{'all':42s} {total / 2**20:7.0f} {total / (tokens_first * layers * hidden):26.1f}")


if __name__ == "__main__":
    main()
