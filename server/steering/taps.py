"""Hooks on each selected layer's attention `o_proj`: read head activations, add steering.

Installed once when the engine loads (they cost a Python call per hooked layer per forward and do
nothing else while idle) and removed when it stops. What they do on a given forward pass is
decided by the decoder through two attributes, never by module-level state:

* `capture = True`: the pre-hook keeps the o_proj *input* at the newest position, i.e. the
  concatenated per-head attention outputs `[B, H*D]` that the probes read.
* `steer = {layer: [B, hidden]}`: the forward hook adds row b's vector to the o_proj *output* at
  every position processed. o_proj is linear, so adding `W_o[:, head] @ (c * sigma * u)` to the
  output equals adding `c * sigma * u` to that head's slice of the input; summing a layer's heads
  gives one precomputed vector per layer instead of per-head work on every token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class HeadTaps:
    def __init__(self, o_projs: list[nn.Module], layers: list[int]):
        self.layers = list(layers)
        self._o_projs = o_projs
        self._handles: list[RemovableHandle] = []
        self.capture = False
        self.steer: dict[int, torch.Tensor] | None = None
        self._captured: list[torch.Tensor | None] = [None] * len(self.layers)

    def install(self) -> "HeadTaps":
        try:
            for slot, layer in enumerate(self.layers):
                module = self._o_projs[layer]
                self._handles.append(module.register_forward_pre_hook(self._capture_hook(slot)))
                self._handles.append(module.register_forward_hook(self._steer_hook(layer)))
        except Exception:
            self.remove()  # never leave half the hooks behind
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def captured(self) -> torch.Tensor:
        """Head activations of the last forward pass: [len(layers), B, H*D]."""
        return torch.stack(self._captured)  # type: ignore[arg-type]

    def _capture_hook(self, slot: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
            if self.capture:
                self._captured[slot] = args[0][:, -1, :]  # args[0]: [B, S, H*D]
            return None

        return hook

    def _steer_hook(self, layer: int):
        def hook(module: nn.Module, args, output: torch.Tensor):
            if self.steer is None:
                return None
            vector = self.steer.get(layer)
            return None if vector is None else output + vector[:, None, :].to(output.dtype)  # [B,S,hidden]

        return hook

    @contextmanager
    def paused(self):
        """Run a forward pass with no capture and no steering (e.g. prefilling a prompt)."""
        capture, steer = self.capture, self.steer
        self.capture, self.steer = False, None
        try:
            yield
        finally:
            self.capture, self.steer = capture, steer
