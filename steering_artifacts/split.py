"""Seeded train / validation / test split by group, so no question's answers straddle two splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # example indices
    val: np.ndarray
    test: np.ndarray
    test_groups: list[str]  # held-out group ids, for the manifest (evaluation must skip them)
    val_groups: list[str]


def split_by_group(groups: list[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """Shuffle the distinct groups with `seed` and cut them train/val/test by `fractions`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1; got {fractions}")
    distinct = list(dict.fromkeys(groups))  # first-appearance order, so the seed alone fixes the split
    if len(distinct) < 3:
        raise ValueError(f"need at least 3 groups (questions) to split train/val/test; got {len(distinct)}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = max(1, round(fractions[2] * len(distinct)))
    n_val = max(1, round(fractions[1] * len(distinct)))
    if n_test + n_val >= len(distinct):
        raise ValueError(f"{len(distinct)} groups are too few for fractions {fractions}: nothing left to train on")
    test_groups = [distinct[i] for i in order[:n_test]]
    val_groups = [distinct[i] for i in order[n_test : n_test + n_val]]
    test_set, val_set = set(test_groups), set(val_groups)
    where = np.array([2 if g in test_set else 1 if g in val_set else 0 for g in groups])
    return Split(
        train=np.flatnonzero(where == 0),
        val=np.flatnonzero(where == 1),
        test=np.flatnonzero(where == 2),
        test_groups=test_groups,
        val_groups=val_groups,
    )
