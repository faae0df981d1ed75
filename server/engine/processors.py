"""Per-sequence decoding state that rolls back with the tokens (docs/architecture.md "Processors").

A processor sees every token a sequence accepts and can be rolled back by n tokens; after a FASB
backtrack the sequence is then exactly as if the dropped tokens had never been generated (docs/api.md
"Structured output and sampling parameters"). What a processor does to the logits is applied for
the whole batch at once by server/engine/logits.py, which reads the state kept here: token counts
for the penalties, how many tokens were generated for min_tokens, the grammar matcher's bitmask.

EOS is never fed to a processor: a sequence that samples it ends (or its final check backtracks
and the EOS is forgotten), so the processors only ever hold the kept answer tokens.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from server.engine.grammar import GrammarMatcher
from server.engine.types import SamplingParams


class Processor(Protocol):
    def accept(self, token: int) -> None: ...
    def rollback(self, n: int) -> None: ...


class TokenCounts:
    """How often each token occurs in the answer so far (presence/frequency/repetition penalties)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.counts: Counter[int] = Counter()

    def accept(self, token: int) -> None:
        self.tokens.append(token)
        self.counts[token] += 1

    def rollback(self, n: int) -> None:
        for token in self.tokens[len(self.tokens) - n :] if n else ():
            self.counts[token] -= 1
            if not self.counts[token]:
                del self.counts[token]
        del self.tokens[len(self.tokens) - n :]


class MinTokens:
    """EOS is forbidden until `minimum` tokens have been generated."""

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum
        self.generated = 0

    @property
    def suppress_eos(self) -> bool:
        return self.generated < self.minimum

    def accept(self, token: int) -> None:
        self.generated += 1

    def rollback(self, n: int) -> None:
        self.generated -= n


class GrammarProcessor:
    """A compiled grammar's matcher: which tokens may come next; done once the grammar is complete."""

    def __init__(self, matcher: GrammarMatcher) -> None:
        self.matcher = matcher

    @property
    def complete(self) -> bool:
        return self.matcher.complete

    def accept(self, token: int) -> None:
        self.matcher.accept(token)

    def rollback(self, n: int) -> None:
        self.matcher.rollback(n)


class DecodingState:
    """The one home of a sequence's rollback-aware state; `logits.py` reads it for the batch.

    logit_bias is static (nothing to roll back) and so lives in the sampling parameters.
    """

    def __init__(self, sampling: SamplingParams, matcher: GrammarMatcher | None = None) -> None:
        self.sampling = sampling
        s = sampling
        penalised = s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0
        self.counts = TokenCounts() if penalised else None
        self.min_tokens = MinTokens(s.min_tokens) if s.min_tokens else None
        self.grammar = GrammarProcessor(matcher) if matcher is not None else None
        self._processors: list[Processor] = [p for p in (self.counts, self.min_tokens, self.grammar) if p is not None]

    @property
    def grammar_complete(self) -> bool:
        """The grammar accepts nothing more: the answer ends here with finish_reason "stop"."""
        return self.grammar is not None and self.grammar.complete

    @property
    def suppress_eos(self) -> bool:
        return self.min_tokens is not None and self.min_tokens.suppress_eos

    def accept(self, token: int) -> None:
        for processor in self._processors:
            processor.accept(token)

    def rollback(self, n: int) -> None:
        for processor in self._processors:
            processor.rollback(n)
