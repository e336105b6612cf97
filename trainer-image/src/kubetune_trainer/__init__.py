"""KubeTune's data plane: `python -m kubetune_trainer train|export|serve`, in pods and locally,
and `copy-model` (`copy_model`: the inference pods' init container copies the served export
off the artifact claim).

Shared leaves: `errors`, `allocator` (the trainer's malloc), `runconfig` (reading `run.json`),
`sources` and `builtin` (where a model or dataset comes from), `hub` (which Hub failures are
worth retrying), `tokenizer` (the serving
tokenizer), `heldout` (the held-out and calibration tokens the trainer leaves the exporter),
`genai_model` (an exported decoder's layout, and the device and execution providers it runs
on, as plain ONNX Runtime runs it), `judge` (the LLM judge of base vs fine-tuned answers, through
an OpenAI-compatible endpoint, for the trainer's evaluation) and the shipped `datasets/` (generated
by `examples/kubectl_dataset.py` and `examples/task_datasets.py`).
`train`, `export` and `serve` are independent packages built on those leaves; none imports
another. From the control plane only `kubetune.api` is imported.
"""
