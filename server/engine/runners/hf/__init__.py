"""The `hf` runner: transformers' own forward over a batched `DynamicCache`; runs any model
transformers runs."""

from server.engine.runners.hf.runner import HFRunner

__all__ = ["HFRunner"]
