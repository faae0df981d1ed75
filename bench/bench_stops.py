"""Cost of stop-string matching per generated token (server/engine/stops.py), for choosing the caps
on `stop` (server/api/protocol.py MAX_STOP_SEQUENCES, MAX_STOP_CHARS; docs/operations.md "Reliability").

Every running sequence with stop strings pays `find` + `holdback` on each new token, on the decode
worker's thread. The table gives microseconds per token for k strings of L characters, on random
text and on two adversarial inputs (many candidate prefixes that fail; long comparisons that fail
late). No model, no server: `python bench/bench_stops.py`.
"""

from __future__ import annotations

import argparse
import random
import string
import time

from server.engine import stops as stops_module
from server.engine.stops import StopMatcher

ALPHABET = string.ascii_letters + " "
SHAPES = [(4, 16), (4, 256), (16, 64), (16, 256), (32, 256), (16, 1024)]


def inputs(k: int, length: int, rng: random.Random) -> dict[str, tuple[list[str], str]]:
    return {
        "random": (
            ["".join(rng.choices(ALPHABET, k=length)) for _ in range(k)],
            "".join(rng.choices(ALPHABET, k=4000)),
        ),
        # the text ends in "xb": every prefix of "abab..." that ends in "b" is tried, and fails
        "many candidates": ([("ab" * length)[: length - 1] + str(i) for i in range(k)], "a" * 3000 + "xb" * 500),
        # prefixes "aaa...a" against a text ending "...ba": equal first and last characters, late mismatch
        "late mismatch": (["a" * (length - 2) + "c" + str(i) for i in range(k)], "a" * 3000 + "ba" * 500),
        # as "many candidates", but no prefix shared between the strings, and their first characters
        # all occur in the text: every candidate passes the first-character check
        "distinct": ([chr(99 + i) + ("ab" * length)[: length - 2] for i in range(k)],
                     "".join(chr(99 + i) + "b" for i in range(k)) * 250),
    }


def build_ms(stops: list[str]) -> float:
    """The one-off cost of a request's stops: building the automaton on the first holdback."""
    stops_module._prefix_automaton.cache_clear()  # requests with the same stops share one
    started = time.perf_counter()
    StopMatcher(stops).holdback("x")
    return (time.perf_counter() - started) * 1e3


def per_token_us(stops: list[str], text: str, tokens: int) -> float:
    matcher = StopMatcher(stops)
    matcher.holdback("x")  # built once per request: see build_ms
    texts = [text[: 2000 + 4 * i] for i in range(tokens)]  # ~4 characters per token
    started = time.perf_counter()
    for t in texts:
        matcher.find(t, len(t) - 4)
        matcher.holdback(t)
    return (time.perf_counter() - started) / tokens * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    print("| stop strings | per token: random | many candidates | late mismatch | distinct | once: build |")
    print("|---|---|---|---|---|---|")
    for k, length in SHAPES:
        cases = inputs(k, length, rng)
        cells = [f"{per_token_us(*case, args.tokens):.0f} µs" for case in cases.values()]
        cells.append(f"{build_ms(cases['random'][0]):.1f} ms")
        print(f"| {k} x {length} chars | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
