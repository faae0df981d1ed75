"""Measures of the guard evaluation: AUROC and the paired comparisons against `off` (looping, the
fluency check, is the `repetition` judge's `loops`: steering_artifacts/builder/judges.py)."""

from __future__ import annotations

import numpy as np

from eval.core.bootstrap import bootstrap_interval, paired_difference
from steering_artifacts.builder.false_alarm import auroc as two_set_auroc


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
