"""ONNX Runtime custom ops the batching engine's graph may use, written in C and built on the
machine that runs them: `lora_branch` (`lora_branch.c`), one fed LoRA branch as one node
(`LoraBranch`, domain `kubetune`), and how its library is found or built.

`include/` holds ONNX Runtime's C API headers as published (MIT, API version 24, unmodified):
the kernel reaches ONNX Runtime only through the function table it is handed, so it builds
against these and loads into any runtime of that API version or later.

Imports the standard library and `kubetune.api` (where KubeTune's cache is): the image
builds the kernels with nothing else loaded.
"""
