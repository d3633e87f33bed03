"""Offline triplet generation: random, hard and semi-hard negatives.

Hard and semi-hard mining use embeddings computed once per image and one
vectorised distance matrix per class, never a loop over pairs.
"""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from .data import ImageFolder
from .distance import squared_distances
from .errors import ConfigError, DatasetError
from .io import atomic_path

STRATEGIES = ("random", "hard", "semihard")
COLUMNS = ["anchor", "positive", "negative", "anchor_class", "negative_class"]


def _class_pairs(members: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """All (anchor, positive) index pairs of one class, capped by a seeded sample."""
    pairs = np.array(list(combinations(range(len(members)), 2)), dtype=np.int64).reshape(-1, 2)
    if cap is not None and len(pairs) > cap:
        pairs = pairs[np.sort(rng.choice(len(pairs), size=cap, replace=False))]
    return pairs


def pick_negatives(
    ap_distance: np.ndarray, an_distance: np.ndarray, strategy: str, margin: float
) -> np.ndarray:
    """For each pair (row), the column of ``an_distance`` chosen as its negative.

    ``hard``: the negative whose distance to the anchor is closest to d(A,P) (the
    seed's rule). ``semihard``: the nearest negative with d(A,P) < d(A,N) <
    d(A,P) + margin, or the nearest negative overall when no negative is in that band.
    """
    ap = ap_distance[:, None]
    if strategy == "hard":
        return np.abs(an_distance - ap).argmin(axis=1)
    if strategy == "semihard":
        in_band = (an_distance > ap) & (an_distance < ap + margin)
        banded = np.where(in_band, an_distance, np.inf).argmin(axis=1)
        return np.where(in_band.any(axis=1), banded, an_distance.argmin(axis=1))
    raise ConfigError(f"unknown mining strategy '{strategy}'")


def generate_triplets(
    folder: ImageFolder,
    strategy: str = "random",
    embeddings: np.ndarray | None = None,
    margin: float = 0.5,
    max_pairs_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Build a triplet table (anchor, positive, negative paths and their classes).

    Every anchor-positive pair within a class (up to ``max_pairs_per_class``) gets
    one negative from another class: random, or mined from ``embeddings`` (one row
    per image of ``folder``) for ``hard`` and ``semihard``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown triplet strategy '{strategy}', expected one of {STRATEGIES}")
    if strategy != "random" and (embeddings is None or len(embeddings) != len(folder)):
        raise ValueError(f"'{strategy}' mining needs one embedding per image")
    if len(folder.class_names) < 2:
        raise DatasetError(f"{folder.root}: triplets need at least two classes")
    rng = np.random.default_rng(seed)
    labels = folder.labels
    rows = []
    for label in range(len(folder.class_names)):
        members = np.flatnonzero(labels == label)
        others = np.flatnonzero(labels != label)
        pairs = _class_pairs(members, max_pairs_per_class, rng)
        if not len(pairs):
            continue
        anchors, positives = members[pairs[:, 0]], members[pairs[:, 1]]
        if strategy == "random":
            negatives = others[rng.integers(0, len(others), size=len(pairs))]
        else:
            assert embeddings is not None  # checked above: mining needs one embedding per image
            anchor_rows = squared_distances(embeddings[members], embeddings)[pairs[:, 0]]
            ap_distance = anchor_rows[np.arange(len(pairs)), positives]
            negatives = others[pick_negatives(ap_distance, anchor_rows[:, others], strategy, margin)]
        rows.append(np.stack([anchors, positives, negatives], axis=1))
    if not rows:
        raise DatasetError(f"{folder.root}: no class has two images, so no triplet can be formed")
    index = np.concatenate(rows)
    paths = np.asarray(folder.paths, dtype=object)
    names = np.asarray(folder.class_names, dtype=object)
    return pd.DataFrame(
        {
            "anchor": paths[index[:, 0]],
            "positive": paths[index[:, 1]],
            "negative": paths[index[:, 2]],
            "anchor_class": names[labels[index[:, 0]]],
            "negative_class": names[labels[index[:, 2]]],
        }
    )


def save_triplets(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the triplet table as CSV, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def load_triplets(path: str | os.PathLike) -> pd.DataFrame:
    """Read a triplet table written by :func:`save_triplets`."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise DatasetError(f"{path}: not a triplet table (missing columns {sorted(missing)})")
    return table
