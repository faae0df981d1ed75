"""Structured output: `response_format` compiled to a grammar, one matcher per sequence (llguidance).

Why llguidance (docs/architecture.md "Why llguidance" has the comparison): no dependencies
(xgrammar pulls triton and apache-tvm-ffi), `rollback(n)` with no depth limit set up front, schemas
compiled in well under a millisecond, and unsupported keywords reported by name, which the API
turns into a 400.

The vocabulary is given to llguidance as each token's raw bytes (the same bytes the logprobs
report), so any tokenizer whose pieces we can read works, whatever its decoder pipeline looks like.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from functools import lru_cache

import llguidance
import torch

from server.engine.detokenizer import token_bytes
from server.engine.types import ResponseFormat
from server.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Compact separators in json.dumps's style; no free whitespace, so a finished value is finished
# (a model cannot pad it with newlines until max_tokens) and the grammar's end ends the answer.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class _VocabularyBytes:
    """What llguidance.TokenizerWrapper reads: each token's bytes, EOS, and how to tokenize text."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int) -> None:
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_token_id
        known = len(tokenizer)
        self.tokens = [bytes(token_bytes(tokenizer, i) or b"") if i < known else b"" for i in range(vocab_size)]
        # Special tokens are never text the grammar can produce; nor are ids the tokenizer lacks.
        self.special_token_ids = sorted(set(tokenizer.all_special_ids) | set(range(known, vocab_size)))
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


class GrammarCompiler:
    """Compiles response formats for one model's vocabulary; its matchers fill [B, ceil(V/32)] bitmasks."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int) -> None:
        self.vocab_size = vocab_size
        vocabulary = _VocabularyBytes(tokenizer, vocab_size, eos_id)
        self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary))
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def matcher(self, fmt: ResponseFormat) -> GrammarMatcher:
        """A fresh matcher; raises InvalidRequestError naming what the schema uses that is unsupported.

        The grammar is compiled (and cached) here, on the caller's thread, so a bad schema is a 400
        before anything streams; the parser itself is built on first use, on the decode worker,
        since building it releases the GIL and would let the worker start the first of a burst of
        requests before the rest were submitted (bench/bench_structured.py)."""
        grammar = self._compile(fmt)
        return GrammarMatcher(lambda: llguidance.LLMatcher(self._tokenizer, grammar, log_level=0))

    def _compile_uncached(self, fmt: ResponseFormat) -> str:
        try:
            grammar = _grammar(fmt)
        except Exception as exc:  # the schema is not even JSON-schema shaped
            raise InvalidRequestError(f"this JSON schema cannot be compiled: {exc}", param=fmt.param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise InvalidRequestError(_unsupported_message(messages[0]), param=fmt.param)
        return grammar


def _grammar(fmt: ResponseFormat) -> str:
    # Tool calls arrive as a lark grammar whose %json blocks carry these options themselves.
    if fmt.type == "lark":
        return llguidance.LLMatcher.grammar_from_lark(fmt.schema or "")
    schema = {"type": "object"} if fmt.type == "json_object" else fmt.schema or "{}"
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


def _unsupported_message(error: str) -> str:
    keys = re.search(r"Unimplemented keys: (\[[^\]]*\])", error)
    if keys:
        names = ", ".join(json.loads(keys.group(1)))
        return f"this JSON schema uses keywords that structured output does not support: {names}"
    return f"this JSON schema is not supported for structured output: {error.splitlines()[0][:300]}"


class GrammarMatcher:
    """One sequence's position in its grammar; accept, roll back and mask, token by token."""

    def __init__(self, build: Callable[[], llguidance.LLMatcher]) -> None:
        self._build = build
        self._built: llguidance.LLMatcher | None = None

    @property
    def _matcher(self) -> llguidance.LLMatcher:
        if self._built is None:
            self._built = self._build()
            self._check()
        return self._built

    @property
    def complete(self) -> bool:
        """Nothing but EOS may follow: the grammar is finished."""
        return self._matcher.is_stopped()

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()

    def rollback(self, n: int) -> None:
        if n and not self._matcher.rollback(n):
            raise RuntimeError(f"the grammar matcher could not roll back {n} tokens")
        self._check()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into bitmask[row] (int32 CPU tensor, bit i of word w: token 32w+i)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher error: {self._matcher.get_error().splitlines()[0][:300]}")


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask -> [B, vocab_size] bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
