"""Serving: engines (vLLM, transformers), the HTTP server, the GRPO job and `init` / `serve`.

Nothing heavy is imported here, so `espalier.inference.launch` starts fast.
"""
