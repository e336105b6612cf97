"""`python -m kubetune_trainer export`: a trained model to a verified ONNX Runtime GenAI model.

`run` is the command (merge, build, verify, write `export.json`), `auto` chooses `precision:
Auto`'s weights by scoring candidates against FP32, `requantize` re-rounds INT4 weights by GPTQ,
`parity` compares greedy continuations with PyTorch, `tokenizer_parity` checks the serving
tokenizer against the training one, `evaluate` scores the exported weights on the run's task
metrics (`export.json`'s `metrics`). Imports the package's shared leaves and `kubetune.api`;
never `train` or `serve`.
"""
