"""The `static` runner: preallocated slots and one compiled decode step (gpt-fast's shape), for
Llama-family models."""

from server.engine.runners.static.runner import StaticRunner

__all__ = ["StaticRunner"]
