"""`python -m kubetune_trainer serve`: the OpenAI-compatible server over an ONNX model.

`server` is the command and the aiohttp app, `http` its plumbing, `completions` the handlers,
`protocol` and `requests` the request model and its validation, `schema` the same wire format
as pydantic models and the OpenAPI document built from them, `structured` the grammar of a
`response_format` and the token mask that enforces it, `metrics` the Prometheus metrics,
`adapters` the LoRA adapters served beside the base (`--lora-modules`), `adapter_routes`
the endpoints that load and unload them at run time; `engines` generate
tokens. Imports the package's shared leaves and `kubetune.api`; never
`train` or `export`.
"""
