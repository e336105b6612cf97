"""Training throughput: KubeTune's trainer vs a plain transformers `Trainer` + peft LoRA script.

    python bench/train_throughput.py [--steps 6] [--batch 8] [--records-min 16 --records-max 512]

Both sides train the built-in SmolLM2-135M-Instruct with the same LoRA (r=16, alpha=32,
dropout 0.05, all-linear), the same deterministic chat dataset of varied lengths (one epoch of
`steps x batch` records, so both see exactly the same records), the same number of optimizer
steps and the same global batch. The baseline is what a user would write: `Trainer`,
`per_device_train_batch_size = batch`, `DataCollatorForSeq2Seq` padding each batch to its
longest record, SDPA attention. Each side runs in its own child process; tokens/s counts real
(non-pad) tokens over the training loop only (model loading excluded), and peak memory is the
child's RSS high-water mark (`ru_maxrss`). A `kubetune-padded` variant (packing off: records
sorted by length into micro-batches, each padded) shows what packing itself is worth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "pod", "node", "deploy", "service", "namespace", "replica", "config", "secret", "volume",
    "claim", "ingress", "label", "selector", "rollout", "restart", "scale", "image",
    "container", "port", "cluster", "role", "binding", "quota", "limit", "request", "taint",
    "toleration", "affinity", "job", "cron", "daemon", "stateful",
]


def dataset(path: Path, records: int, shortest: int, longest: int, tokenizer: Any) -> list[int]:
    """`records` chat records whose templated length is spread evenly over [shortest,
    longest] tokens (deterministic); returns the lengths."""
    rng = random.Random(1234)
    lines: list[str] = []

    def tokens(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    overhead = tokens([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    for index in range(records):
        target = shortest + (longest - shortest) * index // max(1, records - 1)
        words = max(2, target - overhead)  # these words are one token each (with a space)
        question = " ".join(rng.choice(WORDS) for _ in range(max(1, words // 3)))
        answer = " ".join(rng.choice(WORDS) for _ in range(max(1, words - words // 3)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return [tokens(json.loads(line)["messages"]) for line in lines]


def child_kubetune(args: argparse.Namespace) -> dict[str, Any]:
    from kubetune_trainer.train import run as train

    micro = args.micro_batch
    config = {
        "name": "bench",
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": f"file://{args.data}", "format": "Chat"},
            "method": "LoRA",
            "lora": {"rank": 16, "alpha": 32, "dropout": "0.05"},
            "training": {"epochs": 1, "maxSteps": args.steps, "batchSize": args.batch,
                         "maxSeqLength": args.max_len, "learningRate": "2e-4",
                         "warmupRatio": "0", "lrScheduler": "Constant", "logEverySteps": 1,
                         "packing": args.packing},
            "resources": {"gpusPerNode": 0},
            "checkpoint": {"everySteps": 100000},
        },
        "plan": {"worldSize": 1, "zeroStage": 0, "microBatchSize": micro,
                 "gradientAccumulationSteps": args.batch // micro,
                 "globalBatchSize": args.batch, "estimatedGpuMemoryGiB": "1"},
    }
    out = Path(args.work) / ("kubetune" if args.packing else "kubetune-padded")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(config))
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(out / "termination-log")
    code = train.main(["--config", str(out / "run.json"), "--output", str(out)])
    report = json.loads((out / "report.json").read_text())
    if code:
        raise SystemExit(f"kubetune failed: {report['error']}")
    loop_seconds = report["trainTokens"] / report["tokensPerSecond"]
    return {"tokens": report["trainTokens"], "seconds": loop_seconds,
            "steps": report["steps"], "loss": report["trainLoss"]}


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from kubetune_trainer.builtin import builtin_model_dir
    from kubetune_trainer.train.data import load_examples
    from kubetune_trainer.train.encoding import encode

    path = builtin_model_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Same token ids and loss mask as KubeTune, so both do the same work per record.
    _, examples = load_examples(Path(args.data), "Chat")
    encoded = [encode(tokenizer, e, args.max_len) for e in examples]
    data = [{"input_ids": r.input_ids, "labels": r.labels,
             "attention_mask": [1] * len(r.input_ids)} for r in encoded]
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    seen = {"tokens": 0}

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return dict(batch)

    trainer = Trainer(
        model=model, train_dataset=data, data_collator=counting,
        args=TrainingArguments(
            output_dir=str(Path(args.work) / "baseline"), per_device_train_batch_size=args.batch,
            max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=42,
            dataloader_num_workers=0, remove_unused_columns=False,
        ),
    )
    began = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - began
    return {"tokens": seen["tokens"], "seconds": seconds, "steps": trainer.state.global_step,
            "loss": result.training_loss}


def run_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--data", str(args.data),
               "--work", str(args.work), "--steps", str(args.steps), "--batch", str(args.batch),
               "--max-len", str(args.max_len), "--micro-batch", str(args.micro_batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-4000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--records-min", type=int, default=16)
    parser.add_argument("--records-max", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="KubeTune's planned micro-batch (its packed rows hold up to "
                        "micro-batch x max-len tokens); the global batch stays --batch")
    parser.add_argument("--variants", default="baseline,kubetune,kubetune-padded")
    parser.add_argument("--child", choices=["baseline", "kubetune", "kubetune-padded"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        args.packing = args.child == "kubetune"
        result = child_baseline(args) if args.child == "baseline" else child_kubetune(args)
        result["peakRssMiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    from transformers import AutoTokenizer

    from kubetune_trainer.builtin import builtin_model_dir

    args.work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    args.data = args.work / "data.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m-instruct"))
    lengths = dataset(args.data, args.steps * args.batch, args.records_min, args.records_max,
                      tokenizer)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{len(lengths)} records of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}); {args.steps} steps x batch {args.batch}")
    results = {}
    for kind in args.variants.split(","):
        results[kind] = run_child(kind, args)
        r = results[kind]
        print(f"{kind:16s} tokens/s {r['tokens'] / r['seconds']:8.1f}  tokens {r['tokens']}  "
              f"seconds {r['seconds']:7.1f}  steps {r['steps']}  peak RSS {r['peakRssMiB']:7.0f} "
              f"MiB  final loss {r['loss']:.3f}")
    if "baseline" in results:
        base = results["baseline"]
        for kind, r in results.items():
            if kind != "baseline":
                speed = (r["tokens"] / r["seconds"]) / (base["tokens"] / base["seconds"])
                print(f"{kind} / baseline: {speed:.2f}x tokens/s, peak memory "
                      f"{r['peakRssMiB'] / base['peakRssMiB']:.2f}x")
    print(json.dumps({"results": results, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
