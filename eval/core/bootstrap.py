"""Bootstrap 95% intervals over questions, for a row's metrics and for paired differences between rows.

Percentile bootstrap: resample the questions with replacement `resamples` times (seeded), take the
metric's mean on each resample, report the 2.5th and 97.5th percentiles. A difference between two
rows resamples the *same* questions for both (paired), so question difficulty cancels out.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(values, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """{"mean", "low", "high"} of the mean of per-question `values`."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "low": None, "high": None}
    means = x[_indices(len(x), resamples, seed)].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high)}


def paired_difference(a, b, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """Interval of mean(a - b) over questions, resampling the same questions for both rows."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same questions; got {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, resamples, seed, level)


def format_interval(interval: dict, digits: int = 3) -> str:
    if interval["mean"] is None:
        return "-"
    return f"{interval['mean']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"
