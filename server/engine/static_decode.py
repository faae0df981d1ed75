"""One decode step over the static cache, written as plain tensor code so it compiles to one graph.

It runs a Llama-family model (Llama, Mistral, Qwen2, SmolLM) with the model's own modules and
weights — embeddings, norms, q/k/v/o projections, MLPs, rotary embedding, LM head — but its own
attention over `StaticKVCache`, so nothing here is per architecture except the module names every
Llama-family model in transformers shares. Steering and head capture happen inline, not through
hooks (compare server/steering/taps.py, which does the same on the hf runner):

* the input of `o_proj` at a tap layer is the concatenated head activations the probes read;
* `steer[:, slot]` is added to the output of `o_proj` at tap layer `slot` (o_proj is linear, so this
  equals adding each head's c * sigma * u to its slice of the input; server/steering/bank.py).

Batch row b of a step is cache slot b; rows that hold no request run on dummy inputs and are
ignored by the caller.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.static_cache import StaticKVCache


def _rope_function(layer: nn.Module):
    """The model's own `apply_rotary_pos_emb`, from the module that defines its decoder layer."""
    rope = getattr(sys.modules[type(layer).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"the static runner needs a Llama-family model; {type(layer).__name__} has no "
                         "apply_rotary_pos_emb beside it (use --runner hf)")
    return rope


class StaticDecoder(nn.Module):
    def __init__(self, model: nn.Module, cache: StaticKVCache, tap_layers: list[int]):
        super().__init__()
        base = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, base.layers, base.norm, base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.cache = cache
        self.tap_slot = {layer: slot for slot, layer in enumerate(tap_layers)}
        self.apply_rope = _rope_function(self.layers[0])
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, steer: torch.Tensor,
                key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [S]; steer: [S, taps, hidden]; key_pos: [T] = arange(T), T > every
        position. Returns next-token logits [S, V] and the tap layers' o_proj inputs [taps, S, H*D]."""
        x = self.embed(input_ids)[:, None, :]  # [S, 1, hidden]
        cos, sin = self.rotary(x, positions[:, None])  # [S, 1, D] each
        mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [S, 1, 1, T]: a row sees its past
        captured = []
        for i, layer in enumerate(self.layers):
            heads = self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, positions, mask)
            attn = layer.self_attn.o_proj
            out = F.linear(heads, attn.weight, attn.bias)  # not attn(heads): its tap hooks are for the hf runner
            slot = self.tap_slot.get(i)
            if slot is not None:
                captured.append(heads[:, 0])
                out = out + steer[:, slot, None, :]
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x))[:, 0]  # [S, V]
        taps = torch.stack(captured) if captured else x.new_zeros(0, x.shape[0], self.heads * self.head_dim)
        return logits, taps

    def _attention(self, i: int, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [S, 1, hidden] -> concatenated head outputs [S, 1, H*D], this step's k/v written to the cache."""
        S, D = x.shape[0], self.head_dim
        q = attn.q_proj(x).view(S, 1, self.heads, D).transpose(1, 2)  # [S, H, 1, D]
        k = attn.k_proj(x).view(S, 1, self.kv_heads, D).transpose(1, 2)  # [S, KVH, 1, D]
        v = attn.v_proj(x).view(S, 1, self.kv_heads, D).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        self.cache.write(i, positions, k[:, :, 0], v[:, :, 0])
        k_cache, v_cache = self.cache.layer(i)
        T = mask.shape[-1]
        keys, values = k_cache[:S, :, :T], v_cache[:S, :, :T]  # [S, KVH, T, D]
        # GQA without repeating keys: query head h uses kv head h // G, so the G query heads of a kv
        # head become G query positions of one attention over that head's keys.
        q = q.reshape(S, self.kv_heads, self.heads // self.kv_heads, D)  # [S, KVH, G, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        return out.reshape(S, 1, self.heads * D)  # head h = kv * G + g, as o_proj expects
