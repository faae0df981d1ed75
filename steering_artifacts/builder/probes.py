"""Per-head linear probes, head ranking, steering directions and their scales.

All functions take head activations as `[N, L, H, D]` arrays (or `[N, K, D]` for selected heads)
and labels as `[N]` 0/1 arrays. Probes are exact on *raw* activations: we standardise features
for the solver, then fold the standardisation back into the weights and bias.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

DIRECTION_METHODS = ("mass_mean", "probe")


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float = 1.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """L2 logistic regression on standardised x; returns (w, b) with logit = x @ w + b on raw x."""
    x = x.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-8] = 1.0  # constant features carry nothing; avoid dividing by zero
    model = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit((x - mean) / std, y)
    weight = model.coef_[0] / std
    return weight, float(model.intercept_[0] - weight @ mean)


def fit_head_probes(
    acts: np.ndarray, labels: np.ndarray, C: float = 1.0, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One probe per head: weights [L, H, D] and biases [L, H]."""
    _, num_layers, num_heads, head_dim = acts.shape
    weights = np.zeros((num_layers, num_heads, head_dim))
    biases = np.zeros((num_layers, num_heads))
    heads = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    for layer, head in tqdm(heads, desc="probes", unit="head", disable=not progress):
        weights[layer, head], biases[layer, head] = fit_logistic(acts[:, layer, head], labels, C, seed)
    return weights, biases


def head_logits(acts: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Probe logits for every head: [N, L, H] from acts [N, L, H, D]."""
    return np.einsum("nlhd,lhd->nlh", acts.astype(np.float64), weights) + biases


def head_accuracy(acts: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Accuracy of each head's probe: [L, H]."""
    predictions = head_logits(acts, weights, biases) > 0
    return (predictions == labels[:, None, None].astype(bool)).mean(axis=0)


def rank_heads(accuracy: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the highest accuracy, best first (ties: lower index first)."""
    order = np.argsort(-accuracy.ravel(), kind="stable")[:k]
    return [divmod(int(i), accuracy.shape[1]) for i in order]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # numerically safe for large |x|


def ensemble_probability(selected: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """The monitor's score: mean over the K heads of sigmoid(w_k . a_k + b_k); [N] from [N, K, D]."""
    logits = np.einsum("nkd,kd->nk", selected.astype(np.float64), weights) + biases
    return sigmoid(logits).mean(axis=1)


def ensemble_accuracy(selected: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> float:
    return float(((ensemble_probability(selected, weights, biases) > 0.5) == labels.astype(bool)).mean())


def directions(selected: np.ndarray, labels: np.ndarray, weights: np.ndarray, method: str = "mass_mean") -> np.ndarray:
    """Unit steering directions [K, D] pointing towards the desired label."""
    if method == "mass_mean":
        x = selected.astype(np.float64)
        raw = x[labels == 1].mean(axis=0) - x[labels == 0].mean(axis=0)
    elif method == "probe":
        raw = weights.astype(np.float64)
    else:
        raise ValueError(f"unknown direction method {method!r}; use one of {DIRECTION_METHODS}")
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def projection_std(selected: np.ndarray, unit_directions: np.ndarray) -> np.ndarray:
    """sigma_k: standard deviation of the activations projected on each direction; [K]."""
    return np.einsum("nkd,kd->nk", selected.astype(np.float64), unit_directions).std(axis=0)
