"""The steering math, in one place: probe scores, strength, per-layer steering vectors.

A `BehaviorBank` holds one artifact's tensors on the model's device, arranged so the decoder's
per-token work is a gather and an einsum over all K heads at once (no Python loop over heads):

    p = mean_k sigmoid(w_k . a_k + b_k)        over the request's top-n heads
    c = alpha * (1 - p)  (adaptive)  or  alpha  (fixed)
    a_k += c * sigma_k * u_k                     applied as one vector per layer on o_proj's output
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from server.steering.artifact import SteeringArtifact


def probe_probabilities(acts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head P(desired). acts: [K, B, D], weight: [K, D], bias: [K] -> [B, K]."""
    return torch.sigmoid(torch.einsum("kbd,kd->bk", acts.float(), weight) + bias)


def head_weights(num_heads: int, total: int, device: torch.device) -> torch.Tensor:
    """[total] weights averaging the first `num_heads` heads (heads are sorted best first)."""
    weights = torch.zeros(total, device=device)
    weights[:num_heads] = 1.0 / num_heads
    return weights


class BehaviorBank:
    def __init__(self, artifact: SteeringArtifact, o_projs: list[nn.Module], tap_layers: list[int]):
        weight = o_projs[0].weight
        self.device, self.dtype = weight.device, weight.dtype
        self.name = artifact.behavior
        self.artifact = artifact
        self.num_heads = artifact.num_heads
        self.head_dim = artifact.head_dim
        slot_of = {layer: i for i, layer in enumerate(tap_layers)}
        self.layers = artifact.layers.tolist()
        self.tap_slots = torch.tensor([slot_of[layer] for layer in self.layers], device=self.device)
        self.heads = artifact.heads.to(self.device)
        self.weight = artifact.probe_weight.float().to(self.device)  # [K, D]
        self.bias = artifact.probe_bias.float().to(self.device)  # [K]
        self._o_projs = o_projs
        self._tap_layers = tap_layers
        # The tap layers' vectors are cached per num_heads: requests may use the top n < K heads.
        self.unit_vectors = lru_cache(maxsize=None)(self._unit_vectors)

    def head_probabilities(self, captured: torch.Tensor) -> torch.Tensor:
        """captured: [len(tap_layers), B, H*D] from HeadTaps -> per-head P(desired) [B, K]."""
        n_layers, batch, width = captured.shape
        per_head = captured.view(n_layers, batch, width // self.head_dim, self.head_dim)
        acts = per_head[self.tap_slots, :, self.heads, :]  # [K, B, D]
        return probe_probabilities(acts, self.weight, self.bias)

    def _unit_vectors(self, num_heads: int) -> torch.Tensor:
        """[len(tap_layers), hidden]: each layer's o_proj-output shift at strength c = 1."""
        artifact = self.artifact
        hidden = self._o_projs[0].weight.shape[0]
        vectors = torch.zeros(len(self._tap_layers), hidden, device=self.device, dtype=torch.float32)
        slot_of = {layer: i for i, layer in enumerate(self._tap_layers)}
        for k in range(num_heads):  # once per (behaviour, n), never per token
            layer, head = int(artifact.layers[k]), int(artifact.heads[k])
            shift = (artifact.sigma[k] * artifact.direction[k]).float().to(self.device)  # [D]
            w_o = self._o_projs[layer].weight[:, head * self.head_dim : (head + 1) * self.head_dim].float()
            vectors[slot_of[layer]] += w_o @ shift
        return vectors.to(self.dtype)
