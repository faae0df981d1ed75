"""Read the attention heads' activations at every position of a forward pass.

The server's HeadTaps keep only the newest position, which is all a decoder needs. Multiple-
choice scoring reads a whole answer in one pass, so the monitor needs every position; this
capture only reads (steering stays with HeadTaps).
"""

from __future__ import annotations

import torch
from torch import nn


class AllPositionCapture:
    def __init__(self, o_projs: list[nn.Module], layers: list[int]):
        self._modules = [o_projs[layer] for layer in layers]
        self._values: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []

    def __enter__(self) -> "AllPositionCapture":
        for slot, module in enumerate(self._modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, slot: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
            self._values[slot] = args[0].detach()  # [B, S, H*D]
            return None

        return hook

    def stacked(self) -> torch.Tensor:
        """[len(layers), B, S, H*D] from the last forward pass."""
        return torch.stack(self._values)  # type: ignore[arg-type]
