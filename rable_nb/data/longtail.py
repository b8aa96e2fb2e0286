"""The long-tailed profile and seeded class-wise picks (torch-free).

- Long tail (exponential profile): n_c = int(n_max · IF^(c/(C−1))), the first ``n_c``
  images of each class after a seeded shuffle (:func:`long_tail_indices`).
- Balanced seeded subsets (test sets, sample grids) and the many / medium / few class
  groups by training frequency (:func:`class_groups`).
"""
from __future__ import annotations

import numpy as np

from .. import config
from .images import CLASSES

LONG_TAIL_SEED = 0  # the long tail is fixed; SEED varies only the candidate sets
NUM_CLASSES = len(CLASSES)


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class image counts of the exponential long-tail profile."""
    config.validate({"IMBALANCE_FACTOR": imbalance_factor})
    counts = [int(n_max * imbalance_factor ** (c / (num_classes - 1))) for c in range(num_classes)]
    if min(counts) < 1:
        raise ValueError(f"IMBALANCE_FACTOR={imbalance_factor} with n_max={n_max} leaves a class "
                         f"with no image ({counts}); raise n_max or the factor.")
    return counts


def num_images(P: dict) -> int | None:
    """Training images of a dataset: recorded (``num_images`` of dataset.json) or planned
    from ``N_MAX`` and ``IMBALANCE_FACTOR`` (CIFAR-10's classes); None when unknown."""
    if P.get("num_images") is not None:
        return int(P["num_images"])
    if config.is_int(P.get("N_MAX")) and config.is_number(P.get("IMBALANCE_FACTOR")):
        return sum(long_tail_counts(P["N_MAX"], NUM_CLASSES, P["IMBALANCE_FACTOR"]))
    return None


def long_tail_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices of the first ``counts[c]`` images of each class after a seeded shuffle."""
    picked = []
    for c, n in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if n > len(members):
            raise ValueError(f"class {c} has {len(members)} images, {n} requested")
        rng = np.random.default_rng([seed, c])
        picked.append(np.sort(rng.permutation(members)[:n]))
    return np.concatenate(picked)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Seeded indices of up to ``per_class`` images of every class, grouped by class."""
    counts = np.bincount(labels)
    return long_tail_indices(labels, np.minimum(counts, per_class).tolist(), seed)


def examples_per_class(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Seeded positions of up to ``per_class`` items of every class present, in rows of
    ``per_class`` (one row per class); -1 fills the row of a class with fewer items, so in a
    grid of ``per_class`` columns every class starts its own row (see :func:`take`)."""
    labels = np.asarray(labels)
    picks = balanced_subset(labels, per_class, seed) if len(labels) else np.zeros(0, int)
    rows = []
    for c in np.unique(labels[picks]):
        mine = picks[labels[picks] == c]
        rows.append(np.concatenate([mine, np.full(per_class - len(mine), -1)]))
    return np.concatenate(rows).astype(int) if rows else np.zeros(0, int)


def take(images: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """``images[slots]`` with a white image where a slot is -1."""
    return np.concatenate([images, np.full_like(images[:1], 255)])[slots]


def class_groups(class_counts) -> dict[str, list[int]]:
    """many / medium / few classes by training-set frequency (LT-PLL convention).

    CIFAR-10: the 3 most frequent, the middle 4, the 3 rarest; CIFAR-100: 33/34/33;
    otherwise thirds (the middle group takes the remainder).
    """
    counts = np.asarray(class_counts)
    order = [int(c) for c in np.argsort(-counts, kind="stable")]
    k = len(order) // 3
    return {"many": order[:k], "medium": order[k:len(order) - k], "few": order[len(order) - k:]}


def target_count(class_counts, target: int | None) -> int:
    """Images per class after top-up: ``target``, or n_max when None."""
    return int(np.max(class_counts)) if target is None else int(target)
