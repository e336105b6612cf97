"""The continuous-batching engine: one scheduler thread (`scheduler`) steps every active
sequence (`sequences`) through one decoder run (`decoder`) over a shared KV cache (`kv`) and
samples the next tokens (`sampling`); `lora` adds fed LoRA branches to the decoder's graph so
that each row of a step runs its own adapter, and adapters change without a rebuild; `kernels`
builds the ONNX Runtime custom op (C) that computes each branch in one node.

`kernels` imports only the standard library; the other modules import each other, `kubetune_trainer`
and numpy/onnx/onnxruntime, never the server's HTTP layer.
"""
