"""`python -m kubetune_trainer train`: fine-tune with LoRA, QLoRA, DoRA or full fine-tuning.

`run` is the command; `plancheck` checks at start that the plan was made for the model's
config.json; `prepare`, `data`, `encoding` and `microbatches` turn records into packed
micro-batches, `model`, `attention`, `lean_lora` and `outputs` load and save the model,
`stepper` does the optimizer step (PyTorch or DeepSpeed) with `chunked_loss` (the output
head and loss a chunk of rows at a time), `loop` runs the steps,
`checkpoint`, `stop` and `distributed` make it resumable, stoppable and multi-rank,
`evaluate` measures, `report` writes what the operator reads.
Imports the package's shared leaves and `kubetune.api`; never `export` or `serve`.
"""
