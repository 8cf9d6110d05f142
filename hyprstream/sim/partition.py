"""Splitting a data set across simulated devices (pure, seeded)."""

from __future__ import annotations

import numpy as np

from hyprstream.errors import ValidationError


def iid(n_samples: int, n_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and split into ``n_parts`` nearly equal index sets."""
    if n_parts < 1 or n_samples < n_parts:
        raise ValidationError(f"cannot split {n_samples} samples into {n_parts} parts")
    return [np.sort(p) for p in np.array_split(rng.permutation(n_samples), n_parts)]


def dirichlet(labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator,
              min_samples: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: each class's samples are divided by proportions drawn from Dirichlet(alpha).

    Redraws until every part has at least ``min_samples`` (Hsu et al. 2019); every sample lands in
    exactly one part.
    """
    labels = np.asarray(labels)
    if n_parts * min_samples > len(labels):
        raise ValidationError(f"{len(labels)} samples cannot give {n_parts} parts of >= {min_samples}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_parts, alpha))) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_samples:
            return out
    raise ValidationError(f"no Dirichlet(alpha={alpha}) split gave every part >= {min_samples} samples "
                          f"in {max_tries} draws: raise alpha or lower min_samples")


def sampled(n_samples: int, n_parts: int, min_size: int, max_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shares for a fleet larger than the data set: each part takes between ``min_size`` and ``max_size``
    samples (uniformly) from consecutive passes over the data, each pass a fresh permutation, so that every
    sample is used as evenly as the sizes allow and a part repeats a sample only where its share spans two
    passes. Parts overlap across devices (the data set is smaller than the fleet's)."""
    if n_parts < 1 or not 1 <= min_size <= max_size:
        raise ValidationError(f"cannot draw {n_parts} parts of {min_size} to {max_size} samples")
    if max_size > n_samples:
        raise ValidationError(f"a part of up to {max_size} samples cannot be drawn from {n_samples}")
    sizes = rng.integers(min_size, max_size + 1, n_parts) if max_size > min_size else np.full(n_parts, min_size)
    total = int(sizes.sum())
    passes = -(-total // n_samples)
    stream = np.concatenate([rng.permutation(n_samples) for _ in range(passes)])[:total]
    return np.split(stream, np.cumsum(sizes)[:-1])
