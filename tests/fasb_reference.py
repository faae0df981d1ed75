"""A slow, obviously correct FASB decoder, to check the fast one against.

No KV cache: every step runs the whole sequence through the model. Steering is applied the
textbook way, on the o_proj *input* head slices (the fast decoder adds a precomputed vector to the
o_proj output instead), at every position from the backtrack point on. Greedy decoding only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.steering.artifact import SteeringArtifact
from server.steering.layers import attention_output_projections


@dataclass
class ReferenceResult:
    tokens: list[int]
    backtracks: list[tuple[int, int]] = field(default_factory=list)  # (token_index, tokens_retracted)
    finish_reason: str = "length"


class _Hooks:
    """Per-head capture at the last position and per-head steering from `steer_from` on."""

    def __init__(self, model, artifact: SteeringArtifact, num_heads: int):
        self.artifact, self.n = artifact, num_heads
        self.d = artifact.head_dim
        self.strength, self.steer_from = 0.0, None
        self.captured: dict[int, torch.Tensor] = {}
        o_projs = attention_output_projections(model)
        layers = sorted(set(artifact.layers[:num_heads].tolist()))
        self.handles = [o_projs[layer].register_forward_pre_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0].clone()  # [1, S, H*D]
            if self.steer_from is not None:
                for k in range(self.n):
                    if int(self.artifact.layers[k]) == layer:
                        h = int(self.artifact.heads[k])
                        shift = self.strength * self.artifact.sigma[k] * self.artifact.direction[k]
                        x[:, self.steer_from :, h * self.d : (h + 1) * self.d] += shift.to(x.dtype)
            self.captured[layer] = x[0, -1]
            return (x,)

        return hook

    def score(self) -> float:
        probs = []
        for k in range(self.n):
            layer, h = int(self.artifact.layers[k]), int(self.artifact.heads[k])
            a = self.captured[layer][h * self.d : (h + 1) * self.d].float()
            probs.append(torch.sigmoid(self.artifact.probe_weight[k] @ a + self.artifact.probe_bias[k]))
        return float(torch.stack(probs).mean())

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def reference_fasb(model, artifact, prompt, *, max_tokens, eos_ids, alpha, threshold, backtrack_tokens,
                   num_heads, adaptive=True, max_backtracks=1) -> ReferenceResult:
    hooks = _Hooks(model, artifact, num_heads)
    try:
        return _loop(model, hooks, list(prompt), max_tokens, eos_ids, alpha, threshold, backtrack_tokens,
                     adaptive, max_backtracks)
    finally:
        hooks.remove()


def _loop(model, hooks, prompt, max_tokens, eos_ids, alpha, threshold, s, adaptive, max_backtracks):
    result = ReferenceResult(tokens=[])
    generated: list[int] = []
    just_backtracked = False

    def forward() -> tuple[torch.Tensor, float]:
        ids = torch.tensor([prompt + generated], device=model.device)
        logits = model(input_ids=ids).logits[0, -1]
        return logits, hooks.score()

    def backtrack(p: float) -> None:
        nonlocal generated, just_backtracked
        t = len(generated)
        n = min(t, s)
        result.backtracks.append((t, n))
        generated = generated[: t - n]
        hooks.strength = alpha * (1 - p) if adaptive else alpha
        hooks.steer_from = len(prompt) + len(generated) - 1
        just_backtracked = True

    while True:
        logits, p = forward()
        can_backtrack = len(result.backtracks) < max_backtracks
        t = len(generated)
        if can_backtrack and not just_backtracked and t > 0 and t >= s and p < threshold:
            backtrack(p)
            continue
        just_backtracked = False
        token = int(torch.argmax(logits))
        if token in eos_ids:
            if can_backtrack and p < threshold:  # the last step is always checked
                backtrack(p)
                continue
            result.finish_reason = "stop"
            break
        generated.append(token)
        if len(generated) >= max_tokens:
            _, p_last = forward()
            if len(result.backtracks) < max_backtracks and p_last < threshold:
                backtrack(p_last)
                continue
            break
    result.tokens = generated
    return result
