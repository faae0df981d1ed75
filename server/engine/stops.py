"""Stop strings, matched on the decoded text so a stop may span several tokens."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in growing text and says how much of its tail must be held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty strings would match everywhere; duplicates only cost time.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self.max_len = max((len(s) for s in self.stops), default=0)
        # holdback's candidates: every proper prefix of every stop, filed under its last character
        # and longest first, so a call only tries the prefixes that end like the text does.
        by_last: dict[str, list[str]] = {}
        for stop in self.stops:
            for n in range(1, len(stop)):
                by_last.setdefault(stop[n - 1], []).append(stop[:n])
        self._prefixes = {c: sorted(set(p), key=len, reverse=True) for c, p in by_last.items()}

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int) -> int | None:
        """Earliest index where a stop begins, among matches whose last char is at index >= start.

        Text before `start` was searched by an earlier call, so each stop is only looked for
        where it could overlap the new text: from start - len(stop) + 1 on.
        """
        hits = (text.find(stop, max(0, start - len(stop) + 1)) for stop in self.stops)
        return min((i for i in hits if i >= 0), default=None)

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string.

        Those characters must not be sent yet: the next token may complete the stop, and text
        from the stop on is never shown.
        """
        if not text:
            return 0
        for prefix in self._prefixes.get(text[-1], ()):
            if text.endswith(prefix):
                return len(prefix)
        return 0
