"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017) as Hyprstream aggregation rules.

A rule gets one layer group's deltas: ``rows`` maps each parameter's name to a read-only ``(K, n)``
float32 matrix (row i is client i), ``weights`` the clients' example counts. Krum scores each client by
the summed squared distances from its whole update (all parameters of the group together) to its
``K - f - 2`` nearest others and keeps the best-scored one; Multi-Krum averages the ``m`` best. ``f``, the
number of Byzantine clients tolerated, is the largest with ``K > 2 f + 2``.
"""

from __future__ import annotations

import numpy as np


def _scores(rows: dict[str, np.ndarray]) -> np.ndarray:
    flat = np.concatenate([m.astype(np.float64) for m in rows.values()], axis=1)  # (K, sum of n)
    sq = np.einsum("ij,ij->i", flat, flat)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)  # squared distances
    k = flat.shape[0]
    f = max(0, (k - 3) // 2)
    nearest = max(1, k - f - 2)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :nearest].sum(axis=1)


def multi_krum(rows: dict[str, np.ndarray], weights: np.ndarray, m: int | None = None) -> dict[str, np.ndarray]:
    """The mean of the ``m`` best-scored clients' updates (default: K - f of them)."""
    k = len(weights)
    if k <= 2:  # too few to tell an outlier: the plain mean
        return {name: matrix.mean(axis=0) for name, matrix in rows.items()}
    m = m or k - max(0, (k - 3) // 2)
    best = np.argsort(_scores(rows), kind="stable")[:m]
    return {name: matrix[best].mean(axis=0) for name, matrix in rows.items()}


def krum(rows: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """The update of the one best-scored client."""
    return multi_krum(rows, weights, m=1)
