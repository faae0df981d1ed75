"""Seeded train / validation / test split by group, so no question's answers straddle two splits.

Two ways to cut: `split_by_group` (one held-out test set by fractions, the default) and `fold_split`
(k folds by group for cross-validation: fold i is the test set; eval/README.md, "Cross-validated").
"""

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


def _shuffled_groups(groups: list[str], seed: int, minimum: int = 3) -> tuple[list[str], np.ndarray]:
    """The distinct groups in first-appearance order (so the seed alone fixes the split) and their seeded order."""
    distinct = list(dict.fromkeys(groups))
    if len(distinct) < minimum:
        raise ValueError(f"need at least {minimum} groups (questions) to split train/val/test; got {len(distinct)}")
    return distinct, np.random.default_rng(seed).permutation(len(distinct))


def _assign(groups: list[str], test_groups: list[str], val_groups: list[str]) -> Split:
    """Example indices of each part; every group not in test or val trains."""
    test_set, val_set = set(test_groups), set(val_groups)
    where = np.array([2 if g in test_set else 1 if g in val_set else 0 for g in groups])
    return Split(
        train=np.flatnonzero(where == 0),
        val=np.flatnonzero(where == 1),
        test=np.flatnonzero(where == 2),
        test_groups=test_groups,
        val_groups=val_groups,
    )


def split_by_group(groups: list[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """Shuffle the distinct groups with `seed` and cut them train/val/test by `fractions`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1; got {fractions}")
    distinct, order = _shuffled_groups(groups, seed)
    n_test = max(1, round(fractions[2] * len(distinct)))
    n_val = max(1, round(fractions[1] * len(distinct)))
    if n_test + n_val >= len(distinct):
        raise ValueError(f"{len(distinct)} groups are too few for fractions {fractions}: nothing left to train on")
    test_groups = [distinct[i] for i in order[:n_test]]
    val_groups = [distinct[i] for i in order[n_test : n_test + n_val]]
    return _assign(groups, test_groups, val_groups)


def fold_split(groups: list[str], folds: int, fold: int, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Fold `fold` of `folds`: the seeded shuffle of the groups cut into `folds` near-equal parts; that part
    is the test set, validation is the first `val_fraction` of all groups among the other parts (in shuffled
    order, so with 5 folds and 0.2 it is fold 0's groups, or fold 1's when fold 0 is the test set), and the
    rest trains. Every group is tested in exactly one fold."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds; got folds={folds}, fold={fold}")
    distinct, order = _shuffled_groups(groups, seed, minimum=folds + 2)
    parts = np.array_split(order, folds)
    rest = np.concatenate([part for i, part in enumerate(parts) if i != fold])
    n_val = max(1, round(val_fraction * len(distinct)))
    if n_val >= len(rest):
        raise ValueError(f"{len(distinct)} groups are too few for {folds} folds and val {val_fraction}")
    return _assign(groups, [distinct[i] for i in parts[fold]], [distinct[i] for i in rest[:n_val]])
