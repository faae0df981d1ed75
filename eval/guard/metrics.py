"""Per-answer measures of the guard evaluation: looping, AUROC, the paired comparisons against `off`."""

from __future__ import annotations

import numpy as np

from eval.core.bootstrap import bootstrap_interval, paired_difference
from steering_artifacts.builder.false_alarm import auroc as two_set_auroc

LOOP_NGRAM = 3
LOOP_SHARE = 0.25  # an answer whose word 3-grams repeat more than this is looping, not fixed
MIN_LETTER_SHARE = 0.5  # below this share of letters among its visible characters, an answer is not prose


def repeated_ngram_share(text: str, n: int = LOOP_NGRAM) -> float:
    """1 - distinct / all word n-grams: 0 for varied text, towards 1 for text that repeats itself."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) >= 2 * n else 0.0


def letter_share(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 1.0


def loops(text: str) -> bool:
    """Not a fluent answer: it repeats itself, or is mostly symbols (a run of emoji is no fix)."""
    return repeated_ngram_share(text) > LOOP_SHARE or letter_share(text) < MIN_LETTER_SHARE


def auroc(scores, labels) -> float | None:
    """P(score of a desired answer > score of an undesired one); None without both kinds."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    return two_set_auroc(s[y], s[~y]) if y.any() and (~y).any() else None


def auroc_interval(scores, labels, resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC with a percentile bootstrap interval over answers."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    point = auroc(s, y)
    if point is None:
        return {"mean": None, "low": None, "high": None, "n": len(s), "undesired": int((~y).sum())}
    rng = np.random.default_rng(seed)
    resampled = (auroc(s[idx], y[idx]) for idx in rng.integers(0, len(s), size=(resamples, len(s))))
    values = [v for v in resampled if v is not None]
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high), "n": len(s), "undesired": int((~y).sum())}


def rate(values) -> dict:
    return bootstrap_interval(np.asarray(values, dtype=np.float64))


def paired(row_values, off_values) -> dict:
    """Interval of mean(off - row): above 0 means the row has fewer of what is counted."""
    return paired_difference(np.asarray(off_values, dtype=np.float64), np.asarray(row_values, dtype=np.float64))
