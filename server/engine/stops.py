"""Stop strings, matched on the decoded text so a stop may span several tokens."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass


class StopMatcher:
    """Finds stop strings in growing text and says how much of its tail must be held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty strings would match everywhere; duplicates only cost time.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self.max_len = max((len(s) for s in self.stops), default=0)

    @functools.cached_property
    def _prefixes(self) -> _PrefixAutomaton:
        # Built on first use, on the decode worker: never on the event loop that submits requests.
        return _prefix_automaton(self.stops)

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
        from the stop on is never shown. Costs one step per character of the last max_len - 1,
        however many stop strings there are.
        """
        return self._prefixes.longest_open_suffix(text[-(self.max_len - 1) :]) if self.max_len > 1 else 0


@dataclass(frozen=True)
class _PrefixAutomaton:
    """Aho-Corasick automaton over the stops' prefixes: node i is a prefix of `depth[i]`
    characters; `fail[i]` is the node of its longest proper suffix that is also a prefix."""

    goto: tuple[dict[str, int], ...]
    fail: tuple[int, ...]
    depth: tuple[int, ...]

    def longest_open_suffix(self, text: str) -> int:
        """The longest suffix of `text` that is a proper prefix of a stop (a node with children)."""
        goto, fail = self.goto, self.fail
        node = 0
        for char in text:
            while node and char not in goto[node]:
                node = fail[node]
            node = goto[node].get(char, 0)
        while node and not goto[node]:  # a whole stop, prefix of no longer one: fall back
            node = fail[node]
        return self.depth[node]


@functools.lru_cache(maxsize=16)  # the n choices (and prompts) of a request share their stops
def _prefix_automaton(stops: tuple[str, ...]) -> _PrefixAutomaton:
    goto: list[dict[str, int]] = [{}]
    depth = [0]
    for stop in stops:
        node = 0
        for char in stop:
            if char not in goto[node]:
                goto.append({})
                depth.append(depth[node] + 1)
                goto[node][char] = len(goto) - 1
            node = goto[node][char]
    fail = [0] * len(goto)
    queue = list(goto[0].values())  # breadth first: a node's fail link is set before its children's
    for node in queue:
        for char, child in goto[node].items():
            link = fail[node]
            while link and char not in goto[link]:
                link = fail[link]
            fail[child] = goto[link].get(char, 0) if goto[link].get(char, 0) != child else 0
            queue.append(child)
    return _PrefixAutomaton(tuple(goto), tuple(fail), tuple(depth))
