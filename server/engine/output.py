"""Turns one sequence's accepted and rolled-back tokens into the events a client sees.

It owns the invariant the streaming API promises: applying every `Retraction` (delete its text
from the end) to the concatenated `TextDelta`s gives exactly the final text. Text is sent only
once it is stable: no half UTF-8 characters (the detokenizer), no prefix of a stop string (it may
still complete), and in `hold` mode nothing from the newest `hold_tokens` tokens, which a
backtrack could still take back.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.stops import StopMatcher
from server.engine.types import Backtrack, EngineEvent, Retraction, TextDelta, TokenLogprob


class TextOutput:
    def __init__(self, tokenizer, prompt_ids: list[int], stops: tuple[str, ...], emit: Callable[[EngineEvent], None]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(stops)
        self._emit = emit
        self._text_end: list[int] = []  # len(text) once token i is appended
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob | None] = []
        self._sent_chars = 0
        self._sent_tokens = 0
        self.stop_at: int | None = None  # where a stop string begins in the text
        self.hold_tokens = 0  # newest tokens whose text must not be sent yet

    @property
    def text(self) -> str:
        return self._detok.text

    def append(self, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Add an accepted token; True when it completed a stop string."""
        searched = len(self._detok.text)
        self._detok.append(token_id)
        self._text_end.append(len(self._detok.text))
        self._token_ids.append(token_id)
        self._logprobs.append(logprob)
        self.stop_at = self._stops.find(self._detok.text, searched)
        return self.stop_at is not None

    def rollback(self, n: int, decided: Backtrack, announce: bool) -> None:
        """Drop the newest n tokens; emit the Retraction of whatever of them was already sent."""
        old_text = self._detok.text
        kept = len(self._token_ids) - n
        new_text = self._detok.rollback(n) if n else old_text
        del self._text_end[kept:], self._token_ids[kept:], self._logprobs[kept:]
        self.stop_at = None
        retract_text = old_text[len(new_text) : self._sent_chars] if self._sent_chars > len(new_text) else ""
        dropped_sent = max(0, self._sent_tokens - kept)
        self._sent_chars = min(self._sent_chars, len(new_text))
        self._sent_tokens -= dropped_sent
        if announce:
            self._emit(Retraction(retract_text, n, dropped_sent, decided.token_index, decided.probe_score,
                                  decided.strength, decided.behaviors))

    def release(self) -> None:
        """Send whatever text can no longer change."""
        text = self._detok.text
        sendable = len(text) - self._stops.holdback(text)
        if self.hold_tokens:
            kept = len(self._text_end) - self.hold_tokens
            sendable = min(sendable, self._text_end[kept - 1] if kept > 0 else 0)
        self._send(text, sendable)

    def finish(self) -> str:
        """Send everything that remains of the final answer, and return that answer."""
        if self.stop_at is None:
            self._detok.flush()
        text = self._detok.text if self.stop_at is None else self._detok.text[: self.stop_at]
        self._send(text, len(text), all_tokens=True)
        return text

    def _send(self, text: str, upto: int, all_tokens: bool = False) -> None:
        tokens_upto = len(self._token_ids) if all_tokens else bisect_right(self._text_end, upto)
        if upto <= self._sent_chars and tokens_upto <= self._sent_tokens:
            return
        new_tokens = slice(self._sent_tokens, max(tokens_upto, self._sent_tokens))
        logprobs = self._logprobs[new_tokens]
        self._emit(
            TextDelta(
                text=text[self._sent_chars : max(upto, self._sent_chars)],
                token_ids=self._token_ids[new_tokens],
                logprobs=logprobs if logprobs and logprobs[0] is not None else None,
            )
        )
        self._sent_chars = max(upto, self._sent_chars)
        self._sent_tokens = max(tokens_upto, self._sent_tokens)
