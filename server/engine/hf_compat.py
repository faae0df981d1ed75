"""The few places where transformers 4.x (>= 4.56) and 5.x differ for us, kept in one module.

Everything else we use (`DynamicCache` with `.layers[i].keys/.values`, `update`,
`batch_select_indices`; `dtype=` in `from_pretrained`; sdpa attention; `logits_to_keep`) is the
same on both. What differs:

* The KV cache's name. A 5.x release after 5.0 renamed the forward argument and the output field
  `past_key_values` to `cache` (5.24 still takes the old name with a FutureWarning and announces
  its removal for 5.40); 4.x and 5.0 know only `past_key_values`. We ask the model's own `forward` signature rather than
  compare version numbers, so a model class that is renamed later (or never) is handled too.
* `apply_chat_template(..., tokenize=True)` returns a `BatchEncoding` by default on 5.x (a list of
  ids on 4.x); `return_dict=False` asks both for the list.
* What `save_pretrained` writes. A tokenizer saved by 5.x names its class `TokenizersBackend`,
  which 4.x cannot load, so the converted copy of the default model (loader.py) is kept per major
  version. The weights and token ids are the same either way (checked: bit-identical safetensors,
  identical encodings and chat-template ids).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import transformers
from transformers import DynamicCache, PreTrainedModel

# "" on 4.x, "-tf5" on 5.x: appended to folder names of files saved by transformers.
SAVED_FILES_TAG = "" if int(transformers.__version__.split(".")[0]) < 5 else "-tf5"


@functools.cache
def _cache_name(model_class: type) -> str:
    # inspect.signature follows the __wrapped__ of transformers' deprecation decorators
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for the model's forward: `cache=` on 5.x, `past_key_values=` on 4.x."""
    return {_cache_name(type(model)): cache}


def output_cache(model: PreTrainedModel, output: Any) -> Any:
    """The KV cache a forward returned (`output.cache` on 5.x, `output.past_key_values` on 4.x)."""
    return getattr(output, _cache_name(type(model)))


def chat_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied with the assistant turn opened, as token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def cache_layers(cache: DynamicCache) -> list[tuple[Any, Any]]:
    """Per layer, the (keys, values) tensors a DynamicCache holds."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(kv: list[tuple[Any, Any]]) -> DynamicCache:
    """A DynamicCache holding these tensors themselves. `update` would concatenate them onto an empty
    tensor, a copy of the whole cache; so each layer is initialised with an empty update (dtype,
    device) and then given the tensors (same on 4.56's and 5.x's `DynamicLayer`)."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[..., :0, :], v[..., :0, :], i)
        layer = cache.layers[i]
        layer.keys, layer.values = k, v
    return cache
