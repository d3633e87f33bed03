"""The gallery of embedded reference images and nearest-class search."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def squared_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """All squared Euclidean distances, ``(q, n)``, computed as one matrix product."""
    queries = np.asarray(queries, dtype=np.float32)
    references = np.asarray(references, dtype=np.float32)
    q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    r_norms = np.einsum("ij,ij->i", references, references)[None, :]
    return np.maximum(q_norms + r_norms - 2.0 * queries @ references.T, 0.0)


@dataclass
class Match:
    """One recognised image: the nearest class, its squared distance, and the top-k classes."""

    label: str
    distance: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    nearest_path: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "label": self.label,
            "distance": self.distance,
            "top_k": [{"label": label, "distance": d} for label, d in self.top_k],
            "nearest_path": self.nearest_path,
        }


@dataclass
class Gallery:
    """Reference embeddings with their class labels and source paths.

    Rows are kept grouped by class (in ``class_names`` order), which lets the
    search take the per-class minimum distance with one vectorised reduction.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.embeddings) == len(self.labels) == len(self.paths)):
            raise ValueError("gallery embeddings, labels and paths differ in length")
        order = np.argsort(self.labels, kind="stable")
        self.embeddings, self.labels = self.embeddings[order], self.labels[order]
        self.paths = [self.paths[i] for i in order]
        present = np.unique(self.labels)
        if len(present) != len(self.class_names):
            raise ValueError("every gallery class needs at least one image")
        self._class_starts = np.searchsorted(self.labels, np.arange(len(self.class_names)))

    def __len__(self) -> int:
        return len(self.labels)

    def class_distances(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-class nearest distance ``(q, classes)`` and the index of each query's nearest row."""
        distances = squared_distances(queries, self.embeddings)
        return np.minimum.reduceat(distances, self._class_starts, axis=1), distances.argmin(axis=1)

    def search(self, queries: np.ndarray, top_k: int = 5, chunk: int = 1024) -> list[Match]:
        """The nearest class of every query embedding, with the ``top_k`` nearest classes."""
        k = min(top_k, len(self.class_names))
        matches: list[Match] = []
        for start in range(0, len(queries), chunk):
            per_class, nearest = self.class_distances(queries[start : start + chunk])
            best = np.argsort(per_class, axis=1, kind="stable")[:, :k]
            for row, classes, near in zip(per_class, best, nearest):
                ranked = [(self.class_names[c], float(row[c])) for c in classes]
                matches.append(Match(ranked[0][0], ranked[0][1], ranked, self.paths[near]))
        return matches

    def extend(self, embeddings: np.ndarray, label_names: list[str], paths: list[str]) -> Gallery:
        """A new gallery with more images; unseen label names become new classes."""
        names = list(self.class_names)
        index = {name: i for i, name in enumerate(names)}
        for name in label_names:
            if name not in index:
                index[name] = len(names)
                names.append(name)
        labels = np.array([index[name] for name in label_names], dtype=np.int64)
        return Gallery(
            np.concatenate([self.embeddings, np.asarray(embeddings, np.float32)]),
            np.concatenate([self.labels, labels]),
            names,
            list(self.paths) + list(paths),
        )

    def save(self, path: str | Path) -> None:
        """Write the gallery as an ``.npz`` (no pickled objects)."""
        with open(path, "wb") as fh:
            np.savez(
                fh,
                embeddings=self.embeddings,
                labels=self.labels,
                class_names=np.array(self.class_names, dtype=str),
                paths=np.array(self.paths, dtype=str),
            )

    @classmethod
    def load(cls, path: str | Path) -> Gallery:
        """Read a gallery written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls(data["embeddings"], data["labels"], data["class_names"].tolist(), data["paths"].tolist())
