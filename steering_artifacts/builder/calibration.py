"""Calibration of the monitor's score: expected calibration error and a reliability diagram."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def reliability_bins(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted P(desired): count, mean prediction, observed fraction desired."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)  # p == 1 falls in the last bin
    out = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        out.append({
            "low": b / bins, "high": (b + 1) / bins, "count": n,
            "mean_p": float(p[members].mean()) if n else None,
            "frac_desired": float(y[members].mean()) if n else None,
        })
    return out


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """sum over bins of (share of examples) * |observed fraction desired - mean prediction|."""
    total = len(p)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["frac_desired"] - b["mean_p"])
                     for b in reliability_bins(p, y, bins) if b["count"]))


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str,
                     bins: int = 10) -> Path | None:
    """One reliability curve per name (e.g. position bucket) and a histogram of predictions; PNG at `path`.

    Returns None (and logs why) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'fasb-server[plot]'): no reliability diagram")
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 7), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, (p, y) in curves.items():
        points = [b for b in reliability_bins(p, y, bins) if b["count"]]
        ece = expected_calibration_error(p, y, bins)
        top.plot([b["mean_p"] for b in points], [b["frac_desired"] for b in points], marker="o",
                 label=f"{name} (n={len(p)}, ECE {ece:.3f})")
        bottom.hist(p, bins=bins, range=(0, 1), histtype="step", label=name)
    top.set_ylabel("observed fraction desired (true)")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.set_xlabel("monitor score: mean probe P(desired)")
    bottom.set_ylabel("count")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
