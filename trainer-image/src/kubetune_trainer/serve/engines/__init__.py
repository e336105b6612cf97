"""Token generation behind the server: the `Engine` protocol and what both engines share
(`base`, `text`), ONNX Runtime GenAI's generator (`genai`) and KubeTune's continuous-batching
engine (`batch`). No aiohttp: engines see requests, not HTTP.
"""
