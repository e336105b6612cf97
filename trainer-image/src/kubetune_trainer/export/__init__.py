"""`python -m kubetune_trainer export`: a trained model to a verified ONNX Runtime GenAI model.

`run` is the command (merge, build, verify, write `export.json`), `parity` compares greedy
continuations with PyTorch, `tokenizer_parity` checks the serving tokenizer against the
training one. Imports the package's shared leaves and `kubetune.api`; never `train` or `serve`.
"""
