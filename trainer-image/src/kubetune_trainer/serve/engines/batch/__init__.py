"""The continuous-batching engine: one scheduler thread (`scheduler`) steps every active
sequence (`sequences`) through one decoder run (`decoder`) over a shared KV cache (`kv`) and
samples the next tokens (`sampling`).
"""
