"""Training throughput and memory: KubeTune's trainer vs TRL's `SFTTrainer` and a plain
transformers `Trainer` + peft LoRA script, in one run.

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

TRL (`pip install -c requirements/constraints.txt '.[bench]'`) runs `SFTTrainer` on the same
records as conversational prompt-completion rows (loss on the completion, as KubeTune's),
micro-batch `--micro-batch` with accumulation to `--batch`, SDPA, fp32 weights, at its
defaults and at its fastest settings here (`TRL_SETTINGS`); `+tcmalloc` runs a peer under the
allocator KubeTune's trainer preloads, to show what that part is worth. KubeTune runs with the
planner's plan, and its line shows the planner's estimated peak beside the measured one.
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
    """KubeTune as `kubetune run` runs it: the planner's plan (micro-batch and all), under the
    allocator the trainer picks (`run_child` sets it up)."""
    from kubetune.api import FineTuneJobSpec
    from kubetune.planner.plan import plan
    from kubetune_trainer.train import run as train

    config: dict[str, Any] = {
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
    }
    planned = plan(FineTuneJobSpec.model_validate(config["spec"]))
    config["plan"] = planned.model_dump(by_alias=True, exclude_none=True)
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
            "steps": report["steps"], "loss": report["trainLoss"],
            "microBatch": planned.micro_batch_size, "allocator": report["allocator"],
            "estimatedGiB": float(str(planned.estimated_host_memory_gib)),
            "trainerPeakMiB": report["peakMemoryMiB"]}


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


TRL_SETTINGS: dict[str, dict[str, Any]] = {
    # SFTConfig as a user gets it: gradient checkpointing on, bf16 autocast on, TRL's fused
    # chunked LM head (it never builds the full logits), prompt-completion loss.
    "defaults": {},
    # TRL's fastest on this CPU of what was tried (6 steps each, 2-core AMD EPYC): without
    # gradient checkpointing, keeping bf16 autocast: 84.8 tokens/s at 5,374 MiB, against
    # 77.1 at 3,416 MiB for the defaults and 69.6 at 5,997 MiB in fp32 without checkpointing.
    # Padding-free rows need FlashAttention, which CPUs lack, so TRL pads (as here).
    "fast": {"gradient_checkpointing": False},
}


def trl_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The bench records as TRL's conversational prompt-completion rows (loss on the
    completion only, TRL's default for that form)."""
    rows = []
    for line in Path(args.data).read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def child_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubetune_trainer.builtin import builtin_model_dir

    path = builtin_model_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    micro = args.micro_batch
    config = SFTConfig(
        output_dir=str(Path(args.work) / args.child), per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch // micro, max_steps=args.steps,
        max_length=args.max_len, learning_rate=2e-4, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=42,
        dataloader_num_workers=0, dataset_num_proc=1,
        **TRL_SETTINGS[args.child.removeprefix("trl-")],
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(trl_records(args)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    seen = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        mask = batch.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return dict(batch)

    trainer.data_collator = counting
    began = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - began
    return {"tokens": seen["tokens"], "seconds": seconds, "steps": trainer.state.global_step,
            "loss": result.training_loss}


def child_env(kind: str) -> dict[str, str]:
    """KubeTune runs under the allocator its trainer picks; `+tcmalloc` gives a peer the same."""
    from kubetune_trainer import allocator

    if kind.startswith("kubetune") or kind.endswith("+tcmalloc"):
        return allocator.preload_env(os.environ) or dict(os.environ)
    return dict(os.environ)


def run_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--data", str(args.data),
               "--work", str(args.work), "--steps", str(args.steps), "--batch", str(args.batch),
               "--max-len", str(args.max_len), "--micro-batch", str(args.micro_batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env=child_env(kind))
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
                        help="TRL's micro-batch (accumulating to --batch); KubeTune uses the "
                        "planner's")
    trl = [f"trl-{name}" for name in TRL_SETTINGS]
    parser.add_argument("--variants", default=",".join(
        ["baseline", *trl, "trl-fast+tcmalloc", "kubetune", "kubetune-padded"]))
    parser.add_argument("--child", choices=["baseline", "kubetune", "kubetune-padded", *trl,
                                            *(f"{name}+tcmalloc" for name in trl)])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        args.packing = args.child == "kubetune"
        if args.child == "baseline":
            result = child_baseline(args)
        elif args.child.startswith("trl-"):
            args.child = args.child.removesuffix("+tcmalloc")
            result = child_trl(args)
        else:
            result = child_kubetune(args)
        result["peakRssMiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    import importlib.util

    from transformers import AutoTokenizer

    from kubetune_trainer.builtin import builtin_model_dir

    if "trl-" in args.variants and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -c requirements/constraints.txt "
                         "'.[bench]' (or leave the trl-* variants out of --variants)")
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
        print(f"{kind:18s} tokens/s {r['tokens'] / r['seconds']:7.1f}  tokens {r['tokens']}  "
              f"seconds {r['seconds']:6.1f}  steps {r['steps']}  peak RSS {r['peakRssMiB']:6.0f} "
              f"MiB  final loss {r['loss']:.3f}", flush=True)
        if "estimatedGiB" in r:
            measured = r["trainerPeakMiB"] / 1024
            print(f"{'':18s} planner: micro-batch {r['microBatch']}, estimated peak "
                  f"{r['estimatedGiB']:.2f} GiB vs measured {measured:.2f} GiB to the last step "
                  f"({r['estimatedGiB'] / measured - 1:+.0%}); allocator {r['allocator']}")
    def speed(r: dict[str, Any]) -> float:
        return float(r["tokens"] / r["seconds"])

    for peer in [k for k in results if not k.startswith("kubetune")]:
        for kind in [k for k in results if k.startswith("kubetune")]:
            mine, theirs = results[kind], results[peer]
            print(f"{kind} / {peer}: {speed(mine) / speed(theirs):.2f}x tokens/s, peak memory "
                  f"{mine['peakRssMiB'] / theirs['peakRssMiB']:.2f}x")
    print(json.dumps({"results": results, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
