"""server/engine/hf_compat.py on whichever transformers is installed (4.x or 5.x): the cache goes in
and comes out under the model's own name, with no deprecation warning, and chat ids are a list."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from server.engine.hf_compat import cache_kwarg, chat_token_ids, output_cache
from server.engine.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    return loaded.model, loaded.tokenizer


@torch.inference_mode()
def test_cache_round_trip_without_deprecation_warnings(tiny):
    model = tiny[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # 5.x warns on the old name `past_key_values`
        out = model(input_ids=ids[:, :3], **cache_kwarg(model, DynamicCache()), use_cache=True)
        cache = output_cache(model, out)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
        step = model(input_ids=ids[:, 3:], **cache_kwarg(model, cache), use_cache=True)
    assert output_cache(model, step).get_seq_length() == 4
    torch.testing.assert_close(step.logits[0, -1], model(input_ids=ids).logits[0, -1], rtol=1e-4, atol=1e-5)


def test_chat_token_ids_is_the_templated_text_as_a_list_of_ints(tiny):
    tokenizer = tiny[1]
    messages = [{"role": "user", "content": "Is the earth flat?"}]
    ids = chat_token_ids(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
