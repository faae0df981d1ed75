"""Unit tests for stop-string matching across token boundaries (server/engine/stops.py)."""

from __future__ import annotations

import random

import pytest

from server.engine.stops import StopMatcher


def stream(matcher: StopMatcher, pieces: list[str]) -> tuple[int | None, int | None, list[str]]:
    """Feed text piece by piece the way the decode loop does.

    Returns (index of the piece that completed a stop, where the stop begins, what was sent).
    Sent text is everything except the held-back tail, and nothing from a stop on.
    """
    text, sent = "", []
    for i, piece in enumerate(pieces):
        start, text = len(text), text + piece
        hit = matcher.find(text, start)
        sent_len = sum(map(len, sent))
        if hit is not None:
            sent.append(text[sent_len:hit])
            return i, hit, sent
        sent.append(text[sent_len : len(text) - matcher.holdback(text)])
    return None, None, sent


def test_stop_split_across_pieces_is_found_when_completed():
    piece_index, hit, sent = stream(StopMatcher(["STOP"]), ["Hel", "lo ST", "OP now"])
    assert (piece_index, hit) == (2, 6)
    assert sent == ["Hel", "lo ", ""]  # "ST" was held back, then never sent


def test_stop_inside_a_single_piece():
    assert StopMatcher(["\n\n"]).find("a\n\nb", 0) == 1


def test_earliest_stop_wins_regardless_of_list_order():
    text = "abc END xyz STOP"
    assert StopMatcher(["STOP", "END"]).find(text, 0) == 4
    assert StopMatcher(["END", "STOP"]).find(text, 0) == 4


def test_overlapping_stops_report_earliest_start():
    # "bcd" completes first, but "abcdef" begins earlier.
    assert StopMatcher(["bcd", "abcdef"]).find("xabcdef", 0) == 1


def test_first_occurrence_of_a_repeated_stop():
    assert StopMatcher(["ab"]).find("xxabyyab", 0) == 2


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [
        ("xxSTOP", 5, 2),  # ends exactly at start: its last char is new
        ("xxSTOP", 6, None),  # entirely before start: already searched
        ("STOP and more", 10, None),
        ("STOP and STOP", 10, 9),
        ("xxSTOP", 0, 2),
    ],
)
def test_find_only_considers_matches_ending_at_or_after_start(text, start, expected):
    assert StopMatcher(["STOP"]).find(text, start) == expected


def test_empty_and_duplicate_stops_are_ignored():
    matcher = StopMatcher(["", "x", "x"])
    assert matcher.stops == ("x",)
    assert not StopMatcher(["", ""])
    assert StopMatcher([]).find("anything", 0) is None
    assert StopMatcher([""]).holdback("anything") == 0


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (["STOP"], "Hello ST", 2),
        (["STOP"], "Hello S", 1),
        (["STOP"], "Hello", 0),
        (["STOP"], "STOP", 0),  # a whole stop is find()'s business, not a proper prefix
        (["STOP"], "STO", 3),
        (["STOP"], "", 0),
        (["abc", "bcx"], "zab", 2),  # longest over all stops
        (["aab"], "xaaa", 2),  # repeated characters
        (["<|end|>"], "done <|e", 3),
        (["日本語"], "こんにちは日本", 2),
    ],
)
def test_holdback_is_longest_suffix_that_is_a_proper_stop_prefix(stops, text, expected):
    assert StopMatcher(stops).holdback(text) == expected


def brute_find(stops: list[str], text: str, start: int) -> int | None:
    hits = [
        i
        for s in stops
        if s
        for i in range(len(text) - len(s) + 1)
        if text.startswith(s, i) and i + len(s) - 1 >= start
    ]
    return min(hits, default=None)


def brute_holdback(stops: list[str], text: str) -> int:
    return max(
        (n for s in stops for n in range(1, len(s)) if n <= len(text) and text.endswith(s[:n])),
        default=0,
    )


def random_string(rng: random.Random, max_len: int) -> str:
    return "".join(rng.choice("abé") for _ in range(rng.randint(0, max_len)))


def test_find_and_holdback_match_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        stops = [random_string(rng, 4) for _ in range(rng.randint(1, 3))]
        text = random_string(rng, 14)
        start = rng.randint(0, len(text))
        matcher = StopMatcher(stops)
        assert matcher.find(text, start) == brute_find(stops, text, start), (stops, text, start)
        assert matcher.holdback(text) == brute_holdback(stops, text), (stops, text)


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def first_completed_stop(stops: list[str], pieces: list[str]) -> int | None:
    """Where generation must stop: among the stops complete at the first piece that completes one,
    the earliest-beginning (a longer stop that began earlier but would end later never gets the chance)."""
    for end in range(1, len(pieces) + 1):
        hit = brute_find(stops, "".join(pieces[:end]), 0)
        if hit is not None:
            return hit
    return None


def test_streaming_stops_at_first_stop_and_never_sends_part_of_it():
    rng = random.Random(1)
    for _ in range(300):
        stops = [random_string(rng, 3) or "a" for _ in range(rng.randint(1, 2))]
        text = random_string(rng, 16)
        pieces = random_split(rng, text)
        _, hit, sent = stream(StopMatcher(stops), pieces)
        expected = first_completed_stop(stops, pieces)
        assert hit == expected, (stops, pieces)
        if expected is None:  # no stop: everything but a possible held-back tail went out
            assert text.startswith("".join(sent))
        else:  # exactly the text before the stop went out, and none of the stop
            assert "".join(sent) == text[:expected]


def test_short_stop_completing_first_wins_over_longer_earlier_one():
    # "aba" begins first, but "b" is complete one piece before "aba" is.
    piece_index, hit, sent = stream(StopMatcher(["aba", "b"]), ["ab", "a"])
    assert (piece_index, hit, "".join(sent)) == (0, 1, "a")


def _holdback_by_definition(stops: list[str], text: str) -> int:
    """The longest suffix of `text` that is a proper prefix of some stop, checked naively."""
    return max((n for s in stops if s for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def test_holdback_equals_its_definition_on_random_text():
    rng = random.Random(7)
    for _ in range(5000):
        alphabet = rng.choice(["ab", "ab ", "abc\n"])
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 8))]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        assert StopMatcher(stops).holdback(text) == _holdback_by_definition(stops, text), (stops, text)
