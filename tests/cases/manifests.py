"""Invalid FineTuneJob manifests, shared by the offline tests (pydantic) and the e2e tests
(the real API server's schema and CEL rules), so both sides are held to the same cases.

Each case is a base manifest with one change and the field path the error must name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


def base_manifest(name: str = "valid") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "dataset": {"source": "builtin://kubectl-commands"},
            "method": "LoRA",
        },
    }


@dataclass(frozen=True)
class InvalidCase:
    id: str
    path: tuple[str, ...]
    """Where to set the value, below `spec`; the last element is the key."""
    value: Any
    field: str
    """The field the error message must name (as `kubectl` prints it)."""
    delete: bool = False
    also: tuple[tuple[str, Any], ...] = ()
    """Other top-level spec fields to set, for rules that relate two fields."""

    def manifest(self) -> dict[str, Any]:
        manifest = base_manifest(self.id)
        manifest["spec"].update(copy.deepcopy(dict(self.also)))
        node = manifest["spec"]
        for key in self.path[:-1]:
            node = node.setdefault(key, {})
        if self.delete:
            node.pop(self.path[-1], None)
        else:
            node[self.path[-1]] = copy.deepcopy(self.value)
        return manifest


INVALID_CASES = [
    InvalidCase("method-enum", ("method",), "LORA", "spec.method"),
    InvalidCase("method-unknown", ("method",), "Adapter", "spec.method"),
    InvalidCase("format-enum", ("dataset", "format"), "csv", "spec.dataset.format"),
    InvalidCase("precision-enum", ("serving", "precision"), "INT2", "spec.serving.precision"),
    InvalidCase("quantization-enum", ("serving",), {"precision": "INT4", "quantization": "AWQ"},
                "spec.serving.quantization"),
    InvalidCase("device-enum", ("serving", "device"), "TPU", "spec.serving.device"),
    InvalidCase("task-enum", ("evaluation", "task"), "Ranking", "spec.evaluation.task"),
    InvalidCase("metric-enum", ("evaluation", "metrics"), ["meteor"],
                "spec.evaluation.metrics[0]"),
    InvalidCase("offload-enum", ("deepspeed", "offload"), "NVMe", "spec.deepspeed.offload"),
    InvalidCase("scheduler-enum", ("training", "lrScheduler"), "cosine",
                "spec.training.lrScheduler"),
    InvalidCase("zero-stage-range", ("deepspeed", "zeroStage"), 4, "spec.deepspeed.zeroStage"),
    InvalidCase("zero-stage-word", ("deepspeed", "zeroStage"), "Max", "spec.deepspeed.zeroStage"),
    InvalidCase("nodes-zero", ("resources", "nodes"), 0, "spec.resources.nodes"),
    InvalidCase("nodes-negative", ("resources", "nodes"), -2, "spec.resources.nodes"),
    InvalidCase("gpus-negative", ("resources", "gpusPerNode"), -1, "spec.resources.gpusPerNode"),
    InvalidCase("epochs-zero", ("training", "epochs"), 0, "spec.training.epochs"),
    InvalidCase("max-steps-zero", ("training", "maxSteps"), 0, "spec.training.maxSteps"),
    InvalidCase("batch-size-zero", ("training", "batchSize"), 0, "spec.training.batchSize"),
    InvalidCase("batch-size-word", ("training", "batchSize"), "Big", "spec.training.batchSize"),
    InvalidCase("lora-rank-zero", ("lora", "rank"), 0, "spec.lora.rank"),
    InvalidCase("replicas-zero", ("serving", "replicas"), 0, "spec.serving.replicas"),
    InvalidCase("checkpoint-keep-zero", ("checkpoint", "keep"), 0, "spec.checkpoint.keep"),
    InvalidCase("lr-float", ("training", "learningRate"), 0.0002, "spec.training.learningRate"),
    InvalidCase("dropout-float", ("lora", "dropout"), 0.1, "spec.lora.dropout"),
    InvalidCase("lr-not-decimal", ("training", "learningRate"), "fast",
                "spec.training.learningRate"),
    InvalidCase("lr-too-big", ("training", "learningRate"), "2", "spec.training.learningRate"),
    InvalidCase("dropout-one", ("lora", "dropout"), "1.0", "spec.lora.dropout"),
    InvalidCase("lora-with-full", ("method",), "Full", "spec.lora", also=(("lora", {"rank": 8}),)),
    InvalidCase("unknown-field", ("resources", "gpus"), 2, "spec.resources.gpus"),
    InvalidCase("unknown-top-field", ("learningRate",), "2e-4", "spec.learningRate"),
    InvalidCase("missing-model-source", ("model", "source"), None, "spec.model.source",
                delete=True),
    InvalidCase("missing-dataset", ("dataset",), None, "spec.dataset", delete=True),
    InvalidCase("model-scheme", ("model", "source"), "s3://bucket/model", "spec.model.source"),
    InvalidCase("builtin-unknown", ("model", "source"), "builtin://gpt-5", "spec.model.source"),
    InvalidCase("dataset-scheme", ("dataset", "source"), "ftp://x/y.jsonl",
                "spec.dataset.source"),
    InvalidCase("dataset-pvc-no-claim", ("dataset", "source"), "pvc:///data/train.jsonl",
                "spec.dataset.source"),
    InvalidCase("dataset-pvc-claim-uppercase", ("dataset", "source"), "pvc://Data/train.jsonl",
                "spec.dataset.source"),
    InvalidCase("model-pvc-no-claim", ("model", "source"), "pvc:///models/base",
                "spec.model.source"),
    InvalidCase("validation-source-no-scheme", ("dataset", "validation"), {"source": "nope"},
                "spec.dataset.validation.source"),
    InvalidCase("validation-source-scheme", ("dataset", "validation"),
                {"source": "s3://bucket/v.jsonl"}, "spec.dataset.validation.source"),
    InvalidCase("validation-source-builtin-path", ("dataset", "validation"),
                {"source": "builtin://../../../../etc"}, "spec.dataset.validation.source"),
    InvalidCase("validation-source-pvc-no-claim", ("dataset", "validation"),
                {"source": "pvc:///x"}, "spec.dataset.validation.source"),
    InvalidCase("gpu-resource-not-a-name", ("resources", "gpuResource"), "GPU Cards!",
                "spec.resources.gpuResource"),
    InvalidCase("gpu-resource-unprefixed", ("resources", "gpuResource"), "gpu",
                "spec.resources.gpuResource"),
    InvalidCase("gpu-resource-kubernetes-io", ("resources", "gpuResource"),
                "example.kubernetes.io/gpu", "spec.resources.gpuResource"),
    InvalidCase("node-selector-key", ("resources", "nodeSelector"), {"bad key!": "yes"},
                "spec.resources.nodeSelector"),
    InvalidCase("node-selector-key-prefix", ("resources", "nodeSelector"),
                {"Example.com/gpu": "yes"}, "spec.resources.nodeSelector"),
    InvalidCase("node-selector-value", ("resources", "nodeSelector"),
                {"example.com/gpu": "a b"}, "spec.resources.nodeSelector"),
    InvalidCase("toleration-key", ("resources", "tolerations"),
                [{"key": "bad key!", "operator": "Exists"}], "spec.resources.tolerations[0].key"),
    InvalidCase("toleration-no-key-equal", ("resources", "tolerations"),
                [{"effect": "NoSchedule"}], "spec.resources.tolerations[0].operator"),
    InvalidCase("toleration-exists-value", ("resources", "tolerations"),
                [{"key": "example.com/gpu", "operator": "Exists", "value": "yes"}],
                "spec.resources.tolerations[0].value"),
    InvalidCase("toleration-value", ("resources", "tolerations"),
                [{"key": "example.com/gpu", "value": "a b"}],
                "spec.resources.tolerations[0].value"),
    InvalidCase("toleration-seconds-without-noexecute", ("resources", "tolerations"),
                [{"key": "example.com/gpu", "operator": "Exists", "tolerationSeconds": 60}],
                "spec.resources.tolerations[0].tolerationSeconds"),
    InvalidCase("offload-without-zero23", ("deepspeed",), {"zeroStage": 1, "offload": "CPU"},
                "spec.deepspeed.offload"),
    InvalidCase("validation-both", ("dataset", "validation"),
                {"source": "file:///v.jsonl", "splitPercent": 10}, "spec.dataset.validation"),
    InvalidCase("validation-none", ("dataset", "validation"), {}, "spec.dataset.validation"),
    InvalidCase("split-too-big", ("dataset", "validation"), {"splitPercent": 90},
                "spec.dataset.validation.splitPercent"),
    InvalidCase("storage-both", ("storage",), {"claimName": "pvc", "size": "10Gi"},
                "spec.storage"),
    InvalidCase("quantity", ("resources", "memory"), "lots", "spec.resources.memory"),
    InvalidCase("fp16-on-cpu", ("serving",), {"device": "CPU", "precision": "FP16"},
                "spec.serving.precision"),
    InvalidCase("int8-on-cuda", ("serving",),
                {"device": "CUDA", "precision": "INT8", "resources": {"gpus": 1}},
                "spec.serving.precision"),
    InvalidCase("gptq-on-cuda", ("serving",),
                {"device": "CUDA", "precision": "INT4", "quantization": "GPTQ",
                 "resources": {"gpus": 1}}, "spec.serving.quantization"),
    InvalidCase("quantization-without-int4", ("serving",),
                {"precision": "FP32", "quantization": "KQuant"}, "spec.serving.quantization"),
    InvalidCase("cuda-without-gpus", ("serving",), {"device": "CUDA", "resources": {"gpus": 0}},
                "spec.serving"),
    InvalidCase("gate-accuracy", ("serving", "gate"), {"minAccuracy": "1.5"},
                "spec.serving.gate.minAccuracy"),
    # A Secret the API server cannot name leaves the pod in CreateContainerConfigError.
    InvalidCase("model-secret-name", ("model", "secretRef"), {"name": "HF_Token"},
                "spec.model.secretRef.name"),
    InvalidCase("dataset-secret-key", ("dataset", "secretRef"), {"name": "d", "key": "a/b"},
                "spec.dataset.secretRef.key"),
    InvalidCase("share-not-dns-label", ("serving", "share"), "Team_Pool", "spec.serving.share"),
    InvalidCase("share-too-long", ("serving", "share"), "p" * 41, "spec.serving.share"),
    InvalidCase("share-with-api-key", ("serving",),
                {"share": "team", "apiKeySecretRef": {"name": "key"}}, "spec.serving.share"),
    InvalidCase("api-key-secret-name", ("serving", "apiKeySecretRef"), {"name": "api key"},
                "spec.serving.apiKeySecretRef.name"),
    InvalidCase("api-key-secret-key", ("serving", "apiKeySecretRef"),
                {"name": "inference", "key": "..token"}, "spec.serving.apiKeySecretRef.key"),
    InvalidCase("judge-key-secret-name", ("evaluation", "judge"),
                {"endpoint": "http://judge/v1", "model": "j", "apiKeySecretRef": {"name": "J K"}},
                "spec.evaluation.judge.apiKeySecretRef.name",
                also=(("evaluation", {"task": "Chat"}),)),
    InvalidCase("labels-without-classification", ("evaluation",),
                {"task": "Translation", "labels": ["de", "fr"]}, "spec.evaluation.labels"),
    InvalidCase("classification-without-labels", ("evaluation",), {"task": "Classification"},
                "spec.evaluation.labels"),
    InvalidCase("classification-one-label", ("evaluation",),
                {"task": "Classification", "labels": ["billing"]}, "spec.evaluation.labels"),
    InvalidCase("classification-label-repeated", ("evaluation",),
                {"task": "Classification", "labels": ["billing", "access", "billing"]},
                "spec.evaluation.labels"),
    InvalidCase("metric-not-of-task", ("evaluation",),
                {"task": "Translation", "metrics": ["chrF", "macroF1"]},
                "spec.evaluation.metrics"),
    InvalidCase("metrics-without-compared-metric", ("evaluation",),
                {"task": "Translation", "metrics": ["bleu"]}, "spec.evaluation.metrics"),
    InvalidCase("judge-win-rate-without-judge", ("evaluation",),
                {"task": "Chat", "metrics": ["evalLoss", "judgeWinRate"]},
                "spec.evaluation.metrics"),
    InvalidCase("judge-on-a-task-without-win-rate", ("evaluation",),
                {"task": "Summarization", "judge": {"endpoint": "http://judge/v1", "model": "j"}},
                "spec.evaluation.judge"),
    InvalidCase("judge-with-metrics-without-win-rate", ("evaluation",),
                {"task": "Chat", "metrics": ["evalLoss"],
                 "judge": {"endpoint": "http://judge/v1", "model": "j"}},
                "spec.evaluation.judge"),
    InvalidCase("judge-without-endpoint", ("evaluation",),
                {"task": "Chat", "judge": {"model": "judge"}}, "spec.evaluation.judge.endpoint"),
    InvalidCase("judge-endpoint-no-scheme", ("evaluation",),
                {"task": "Chat", "judge": {"endpoint": "judge:8000/v1", "model": "j"}},
                "spec.evaluation.judge.endpoint"),
    InvalidCase("judge-endpoint-scheme", ("evaluation",),
                {"task": "Chat", "judge": {"endpoint": "ftp://judge/v1", "model": "j"}},
                "spec.evaluation.judge.endpoint"),
    InvalidCase("gate-min-metric-not-of-task", ("serving", "gate"), {"min": {"chrF": "55"}},
                "spec.serving.gate.min"),
    InvalidCase("gate-max-metric-not-of-task", ("serving", "gate"),
                {"max": {"outOfLabels": "0.1"}}, "spec.serving.gate.max",
                also=(("evaluation", {"task": "Translation"}),)),
    InvalidCase("gate-min-unknown-metric", ("serving", "gate"), {"min": {"meteor": "0.5"}},
                "spec.serving.gate.min"),
    InvalidCase("gate-min-judge-without-judge", ("serving", "gate"),
                {"min": {"judgeWinRate": "0.6"}}, "spec.serving.gate.min",
                also=(("evaluation", {"task": "Chat"}),)),
    InvalidCase("gate-min-not-decimal", ("serving", "gate"), {"min": {"chrF": 55}},
                "spec.serving.gate.min.chrF", also=(("evaluation", {"task": "Translation"}),)),
    InvalidCase("toleration-operator", ("resources", "tolerations"), [{"operator": "Maybe"}],
                "spec.resources.tolerations[0].operator"),
    InvalidCase("toleration-effect", ("resources", "tolerations"),
                [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "Sometimes"}],
                "spec.resources.tolerations[0].effect"),
]
