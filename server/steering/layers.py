"""Find a model's decoder layers and each layer's attention output projection (`o_proj`).

FASB reads and steers the *input* of the attention output projection: the concatenated per-head
attention outputs, one `head_dim` slice per query head. Architectures name that module
differently, so we try a short table of attribute paths; callers can name the path explicitly
for anything the table does not know.
"""

from __future__ import annotations

from torch import nn

# Where the decoder blocks live, from the root of a *ForCausalLM model (or its base model).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h")
# Where the attention output projection lives inside one decoder block.
O_PROJ_PATHS = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attention.dense")


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    node = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def decoder_layers(model: nn.Module, layer_path: str | None = None) -> nn.ModuleList:
    """The model's decoder blocks, in order.

    `layer_path` (e.g. "model.layers") overrides the lookup table.
    """
    for path in (layer_path,) if layer_path else LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    if layer_path:
        raise ValueError(f"{type(model).__name__} has no non-empty ModuleList at steering.layer_path={layer_path!r}")
    raise ValueError(
        f"don't know how to find decoder layers for {type(model).__name__} (tried {', '.join(LAYER_PATHS)}); "
        "set steering.layer_path"
    )


def attention_output_projections(
    model: nn.Module, layer_path: str | None = None, o_proj_path: str | None = None
) -> list[nn.Module]:
    """The attention output projection of every decoder layer, indexed by layer.

    `o_proj_path` (relative to one decoder block, e.g. "self_attn.o_proj") overrides the table.
    """
    layers = decoder_layers(model, layer_path)
    paths = (o_proj_path,) if o_proj_path else O_PROJ_PATHS
    for path in paths:
        modules = [_get_path(layer, path) for layer in layers]
        if all(isinstance(m, nn.Module) for m in modules):
            return modules
    raise ValueError(
        f"don't know how to find the attention output projection in {type(layers[0]).__name__} "
        f"(tried {', '.join(paths)}); set steering.o_proj_path"
    )
