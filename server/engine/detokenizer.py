"""Incremental detokenisation with rollback, plus per-token text/bytes for logprobs.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers: one character
can span several byte tokens, and a token's leading space depends on what precedes it. Like
vLLM, we decode a small window twice: the tokens already turned into text (prefix_offset up to
read_offset) and the same window plus the new tokens; the new text is the difference. Text
that still ends in U+FFFD is held back because a later byte token may complete the character.

Decoding never applies `clean_up_tokenization_spaces`: that rewrite (" ." -> ".", " 's" ->
"'s") is not local, so streamed text could not match it, and it corrupts code. The reference
text is `tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context, enough for leading-space rules (and like vLLM's 5).
PROMPT_CONTEXT_TOKENS = 5
_SENTENCEPIECE_SPACE = "\u2581"  # "▁"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class _Checkpoint:
    """Decoder state after some number of tokens, restored by rollback."""

    prefix_offset: int
    read_offset: int
    text_len: int


class IncrementalDetokenizer:
    """Turns appended token ids into stable text; rollback restores any earlier state exactly."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._byte_fallback = _has_byte_fallback(tokenizer)
        # Ids that decode drops; they do not end a run of byte tokens.
        self._skipped_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character, so its end is no safe text boundary.
            context = []
        self._num_context = len(context)
        self._ids: list[int] = context  # context + generated ids
        self._prefix_offset = 0  # window start: first token of the last emitted chunk
        self._read_offset = len(context)  # tokens before this are already in `text`
        self._text = ""
        self._checkpoints = [self._checkpoint()]  # [i]: state after i generated tokens

    @property
    def text(self) -> str:
        return self._text

    @property
    def num_tokens(self) -> int:
        return len(self._ids) - self._num_context

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became stable with it (may be "")."""
        self._ids.append(token_id)
        new_text = self._emit(hold_incomplete=True)
        self._checkpoints.append(self._checkpoint())
        return new_text

    def rollback(self, n: int) -> str:
        """Drop the last n tokens; the text becomes what it was right after the token before them."""
        if not 0 <= n <= self.num_tokens:
            raise ValueError(f"cannot roll back {n} of {self.num_tokens} tokens")
        if n:
            del self._checkpoints[-n:]
            del self._ids[-n:]
            self._restore(self._checkpoints[-1])
        return self._text

    def flush(self) -> str:
        """At finish: return whatever is still held back, even a broken UTF-8 tail."""
        new_text = self._emit(hold_incomplete=False)
        self._checkpoints[-1] = self._checkpoint()
        return new_text

    def _emit(self, hold_incomplete: bool) -> str:
        """Decode the window; if its new text is stable, add it to `text` and slide the window."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        if hold_incomplete and (window_text.endswith(REPLACEMENT_CHAR) or self._in_byte_run()):
            return ""  # a later byte token may complete (or break) this character
        new_text = window_text[len(prefix_text) :]
        self._text += new_text
        # The chunk just emitted becomes the next window's left context.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text

    def _in_byte_run(self) -> bool:
        # SentencePiece byte fallback decodes a whole run of <0xNN> tokens at once and renders all
        # of it as U+FFFD if any byte is invalid, so a run's text is only final once it ends.
        if not self._byte_fallback:
            return False
        last = next((i for i in reversed(self._ids) if i not in self._skipped_ids), None)
        piece = self._tokenizer.convert_ids_to_tokens(last) if last is not None else None
        return piece is not None and _BYTE_TOKEN.fullmatch(piece) is not None

    def _checkpoint(self) -> _Checkpoint:
        return _Checkpoint(self._prefix_offset, self._read_offset, len(self._text))

    def _restore(self, cp: _Checkpoint) -> None:
        self._prefix_offset, self._read_offset = cp.prefix_offset, cp.read_offset
        self._text = self._text[: cp.text_len]

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level map, inverted: printable character -> the raw byte it stands for.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space, ...) were
    shifted to code points 256 and up, in byte order, so every token is printable text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in char_to_byte.values()]
    char_to_byte.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return char_to_byte


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()  # constant, never mutated


def _has_byte_fallback(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is None or "ByteFallback" in repr(backend.decoder)


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return "ByteLevel" in repr(backend.decoder)
    return hasattr(tokenizer, "byte_decoder")  # slow GPT-2 style tokenizers


def _piece_bytes(piece: str, byte_level: bool) -> list[int]:
    byte_token = _BYTE_TOKEN.fullmatch(piece)
    if byte_token:  # SentencePiece byte fallback, e.g. <0xE6>
        return [int(byte_token.group(1), 16)]
    if byte_level and all(c in _BYTE_LEVEL_ALPHABET for c in piece):
        return [_BYTE_LEVEL_ALPHABET[c] for c in piece]
    # SentencePiece piece (or one the byte-level map cannot read, kept as text like the decoder does).
    return list(piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8"))


_ADDED_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _added_tokens(tokenizer) -> dict:
    """`tokenizer.added_tokens_decoder`, read once per tokenizer: transformers builds that dict anew on
    every access (~26 ms for Gemma's 6k added tokens, an hour and a half over its 262k-token vocabulary)."""
    try:
        return _ADDED_TOKENS[tokenizer]
    except KeyError:
        return _ADDED_TOKENS.setdefault(tokenizer, tokenizer.added_tokens_decoder)


def token_bytes(tokenizer, token_id: int) -> list[int] | None:
    """The raw UTF-8 bytes one token contributes (OpenAI logprobs `bytes`); None for an unknown id."""
    added = _added_tokens(tokenizer).get(token_id)
    if added is not None:  # special / added tokens are literal text
        return list(added.content.encode("utf-8"))
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return None
    return _piece_bytes(piece, _is_byte_level(tokenizer))


def token_text(tokenizer, token_id: int) -> str:
    """One token as text (OpenAI logprobs `token`); a partial UTF-8 character shows as U+FFFD."""
    raw = token_bytes(tokenizer, token_id)
    return bytes(raw).decode("utf-8", errors="replace") if raw is not None else ""
