"""One decode step over the static cache, written as plain tensor code that compiles without breaks.

It runs a Llama-family model (Llama, Mistral, Qwen2, SmolLM) with the model's own modules and
weights — embeddings, norms, q/k/v/o projections, MLPs, rotary embedding, LM head — but its own
attention over `StaticKVCache`, so nothing here is per architecture except the module names every
Llama-family model in transformers shares. Steering and head capture happen inline, not through
hooks (compare server/steering/taps.py, which does the same on the hf runner):

* the input of `o_proj` is the concatenated head activations the probes read;
* `steer` is added to the output of `o_proj` (o_proj is linear, so this equals adding each head's
  c * sigma * u to its slice of the input; server/steering/bank.py).

The step has no Python hooks, no host syncs and no data-dependent control flow, so the whole of it
compiles as one graph (runner.py). Batch row b of a step is cache slot b; rows
that hold no request run on dummy inputs and are ignored by the caller.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.cpu_kernels import decode_attention, takes_attention
from server.engine.quantize import Int4Linear, QuantizedLinear
from server.engine.runners.static.cache import StaticKVCache

# Model types whose decoder layer is the step's formula: pre-norm attention and MLP, one RoPE, no
# other norms. Others would decode wrongly (Gemma's extra norms and sliding layers, Qwen3's q/k norms).
STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_static_supported(config) -> None:
    """Refuse, before anything is allocated, a model the static step does not implement."""
    model_type = getattr(config, "model_type", None)
    if model_type not in STATIC_MODEL_TYPES:
        raise ValueError(f"--runner static runs {', '.join(STATIC_MODEL_TYPES)} models, not {model_type!r}: "
                         "use --runner hf")


def _rope_function(layer: nn.Module) -> Callable:
    """The model's own `apply_rotary_pos_emb`, from the module that defines its decoder layer."""
    rope = getattr(sys.modules[type(layer).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"the static runner needs a Llama-family model; {type(layer).__name__} has no "
                         "apply_rotary_pos_emb beside it (use --runner hf)")
    return rope


class FusedProjections(nn.Module):
    """A decoder layer's q|k|v and gate|up projections as one quantized matmul each, and under int4
    an int4 copy of its `o_proj`.

    Why: with quantized weights a decode step's matmuls are small and each is a separate kernel
    call with its own fixed cost (and, at 2 threads, its own split of the work): fused, a layer
    makes 4 matmul calls instead of 7, on wider outputs. Built from the model's quantized layers
    (the same codes and scales, so the products are the same sums); only the static step uses it —
    prefill and the hf runner keep the model's own modules. Not for fp32 weights, where the static
    runner's tokens are held equal to the hf runner's.

    `o_proj`: the model keeps its fp32 `o_proj` (steering vectors, artifact fingerprints and the
    prefill read it); the step reads an int4 copy, 1/6 of its bytes. On the default model that copy
    is exact (its o_proj ships as Q4_1, which Int4Linear represents exactly), and the probes read
    o_proj's input and the steering vector is added to its output, so neither depends on the copy.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv = type(attn.q_proj).concatenated(list(parts))
        self.qkv_widths = [p.out_features for p in parts]
        self.gate_up = type(mlp.gate_proj).concatenated([mlp.gate_proj, mlp.up_proj])
        self.act_fn, self.down_proj = mlp.act_fn, mlp.down_proj
        own = attn.o_proj
        as_int4 = type(attn.q_proj) is Int4Linear and type(own) is nn.Linear and Int4Linear.supports(own)
        self.o_proj = Int4Linear(own) if as_int4 else own

    @staticmethod
    def applies(layer: nn.Module) -> bool:
        """Whether the layer's five projections are quantized alike in a Llama-style MLP."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")] + [
            getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        kind = type(parts[0])
        return (issubclass(kind, QuantizedLinear) and all(type(p) is kind for p in parts)
                and hasattr(mlp, "act_fn") and hasattr(mlp, "down_proj"))

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv(h).split(self.qkv_widths, dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)  # LlamaMLP's formula


def decode_layer(layer: nn.Module, fused: FusedProjections | None, rope: Callable, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, steer: torch.Tensor,
                 lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per row.

    x: [S, 1, hidden]; cos, sin: [S, 1, D]; positions: [S]; mask: [S, 1, 1, T]; steer: [S, hidden];
    k_cache, v_cache: this layer's [slots, KVH, max_len, D] (written at each row's position);
    fused: the layer's fused projections, or None to run its own; lengths: positions + 1 to attend
    with our CPU kernel (each row over its own keys, no mask), or None for SDPA over the mask.
    Returns x after the layer and the o_proj input [S, H*D] (the head activations).
    """
    attn = layer.self_attn
    S, D = x.shape[0], attn.head_dim
    h = layer.input_layernorm(x)
    q, k, v = fused.project_qkv(h) if fused is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
    q = q.reshape(S, 1, -1, D).transpose(1, 2)  # [S, H, 1, D]
    k = k.reshape(S, 1, -1, D).transpose(1, 2)  # [S, KVH, 1, D]
    v = v.reshape(S, 1, -1, D).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    heads, kv_heads = q.shape[1], k.shape[1]
    rows = torch.arange(S, device=x.device)
    k_cache[rows, :, positions] = k[:, :, 0]  # row b writes at its own position
    v_cache[rows, :, positions] = v[:, :, 0]
    # GQA without repeating keys: query head h uses kv head h // G, so the G query heads of a kv
    # head become G query positions of one attention over that head's keys.
    q = q.reshape(S, kv_heads, heads // kv_heads, D)  # [S, KVH, G, D]
    if lengths is not None:
        out = decode_attention(q, k_cache, v_cache, lengths, attn.scaling)
    else:
        T = mask.shape[-1]
        keys, values = k_cache[:S, :, :T], v_cache[:S, :, :T]  # [S, KVH, T, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
    head_acts = out.reshape(S, heads * D)  # head h = kv * G + g, as o_proj expects
    # .forward, not attn.o_proj(...): o_proj's tap hooks belong to the hf runner
    o_proj = fused.o_proj if fused is not None else attn.o_proj
    x = x + (o_proj.forward(head_acts) + steer)[:, None, :]
    mlp = fused.mlp if fused is not None else layer.mlp
    x = x + mlp(layer.post_attention_layernorm(x))
    return x, head_acts


def prefill_layer(layer: nn.Module, fused: FusedProjections | None, rope: Callable, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot: int, start: int, x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer for a run of new prompt tokens of one row, written into its slot at columns
    start.. (eager: `slot` and `start` are Python ints, so the slot's cache is read as a view).

    x: [1, Q, hidden]; cos, sin: [1, Q, D]; mask: [1, 1, G*Q, T] additive, T = start + Q.
    The step's attention: no key/value concatenation and no repeated GQA keys, which is what costs
    a short prompt after a long cached prefix most in transformers' forward. The fused projections
    while their packed kernel takes Q rows; above, the layer's own modules (prompt GEMMs with their
    bf16 weights, server/engine/quantize.py; fused ones would keep a second bf16 copy), except
    o_proj, which is the step's int4 copy (its bf16 GEMM: 7-8% of a 70-128-token prefill against the
    fp32 one). Prompt positions are neither read by the probes nor steered.
    """
    attn = layer.self_attn
    Q, D = x.shape[1], attn.head_dim
    h = layer.input_layernorm(x)
    few_rows = fused is not None and Q <= fused.qkv.kernel_max_rows
    q, k, v = fused.project_qkv(h) if few_rows else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
    q = q.reshape(1, Q, -1, D).transpose(1, 2)  # [1, H, Q, D]
    k = k.reshape(1, Q, -1, D).transpose(1, 2)  # [1, KVH, Q, D]
    v = v.reshape(1, Q, -1, D).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    heads, kv_heads = q.shape[1], k.shape[1]
    k_cache[slot, :, start : start + Q] = k[0]
    v_cache[slot, :, start : start + Q] = v[0]
    T = start + Q
    keys, values = k_cache[slot : slot + 1, :, :T], v_cache[slot : slot + 1, :, :T]
    q = q.reshape(1, kv_heads, (heads // kv_heads) * Q, D)  # query head h = kv * G + g, as in decode_layer
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
    head_acts = out.reshape(1, heads, Q, D).transpose(1, 2).reshape(1, Q, heads * D)
    o_proj = fused.o_proj if fused is not None else attn.o_proj
    x = x + o_proj.forward(head_acts)  # .forward: not through the probes' hooks
    mlp = fused.mlp if few_rows else layer.mlp
    return x + mlp(layer.post_attention_layernorm(x))


class StaticDecoder(nn.Module):
    def __init__(self, model: nn.Module, cache: StaticKVCache, tap_layers: list[int]):
        super().__init__()
        base = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, base.layers, base.norm, base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.cache = cache
        tap_slot = {layer: slot for slot, layer in enumerate(tap_layers)}
        self.rope = _rope_function(self.layers[0])
        self.fused = nn.ModuleDict({str(i): FusedProjections(layer) for i, layer in enumerate(self.layers)
                                    if FusedProjections.applies(layer)})
        # per layer, fixed for the decoder's life: its fused projections (None: its own), cache buffers
        # and tap slot (None: no tap)
        self._plan = [(layer, self.fused[str(i)] if str(i) in self.fused else None, cache.layer(i), tap_slot.get(i))
                      for i, layer in enumerate(self.layers)]
        config = model.config
        # Our attention kernel where the weights are quantized (there SDPA's small calls were a third
        # of the step at a batch of 8); fp32 keeps SDPA, whose tokens are held equal to the hf runner's.
        self.own_attention = bool(self.fused) and takes_attention(cache.layer(0)[0], config.num_attention_heads)
        self.kv_groups = config.num_attention_heads // config.num_key_value_heads
        self.act_width = config.num_attention_heads * (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, steer: torch.Tensor,
                key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [S]; steer: [S, taps, hidden]; key_pos: [T] = arange(T), T > every
        position. Returns next-token logits [S, V] and the tap layers' o_proj inputs [taps, S, H*D]."""
        x = self.embed(input_ids)[:, None, :]  # [S, 1, hidden]
        cos, sin = self.rotary(x, positions[:, None])  # [S, 1, D] each
        mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [S, 1, 1, T]: a row sees its past
        unsteered = x.new_zeros(x.shape[0], x.shape[2])  # [S, hidden]
        captured = []
        lengths = positions + 1 if self.own_attention else None
        for layer, fused, (k_cache, v_cache), slot in self._plan:
            layer_steer = unsteered if slot is None else steer[:, slot]
            x, acts = decode_layer(layer, fused, self.rope, k_cache, v_cache, x, cos, sin, positions, mask, layer_steer,
                                   lengths)
            if slot is not None:
                captured.append(acts)
        logits = self.lm_head(self.norm(x))[:, 0]  # [S, V]
        taps = torch.stack(captured) if captured else x.new_zeros(0, x.shape[0], self.act_width)
        return logits, taps

    def prefill(self, slot: int, input_ids: torch.Tensor, start: int) -> None:
        """Write the keys/values of `input_ids` [Q], one row's prompt tokens at positions start..start+Q-1,
        into `slot` (eager; columns 0..start-1 of the slot already hold its earlier positions)."""
        Q = input_ids.shape[0]
        x = self.embed(input_ids)[None]  # [1, Q, hidden]
        positions = torch.arange(start, start + Q, device=input_ids.device)
        cos, sin = self.rotary(x, positions[None])  # [1, Q, D] each
        key_pos = torch.arange(start + Q, device=input_ids.device)
        future = key_pos[None, :] > positions[:, None]  # [Q, T]: causal
        # additive, made once: SDPA would convert a bool mask in every layer
        mask = x.new_zeros(future.shape).masked_fill_(future, float("-inf"))
        mask = mask.repeat(self.kv_groups, 1)[None, None]  # [1, 1, G*Q, T]: the G query heads of a kv head
        for layer, fused, (k_cache, v_cache), _ in self._plan:
            x = prefill_layer(layer, fused, self.rope, k_cache, v_cache, slot, start, x, cos, sin, mask)
