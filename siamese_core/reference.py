"""What normal traffic looks like for a bundle: the reference profile the monitoring compares the inference log with.

The evaluate stage measures it on the test split (queries of known classes): the nearest distances,
the unknown scores and the share of answers that would be ``unknown``, the predicted-class mix, the
gallery's class sizes, and a seeded sample of query embeddings. It is stored as ``reference.npz``
beside the model in the registered bundle (plain arrays, no pickle).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_path

REFERENCE_FILE = "reference.npz"
EMBEDDING_SAMPLE = 512


@dataclass
class ReferenceProfile:
    """The test split's answers, as the monitoring needs them."""

    nearest_distances: np.ndarray
    unknown_scores: np.ndarray  # empty without a calibrated threshold
    threshold: float | None
    predicted: dict[str, int]  # predicted class -> queries
    gallery: dict[str, int]  # gallery class -> images
    embeddings: np.ndarray  # a sample of query embeddings, float16

    @property
    def unknown_rate(self) -> float:
        """The share of test queries over the threshold: the unknowns a served model answers on known classes."""
        if self.threshold is None or not len(self.unknown_scores):
            return 0.0
        return float(np.mean(self.unknown_scores > self.threshold))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile atomically as plain arrays."""
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            np.savez(file, nearest_distances=self.nearest_distances.astype(np.float32),
                     unknown_scores=self.unknown_scores.astype(np.float32),
                     threshold=np.array(np.nan if self.threshold is None else self.threshold),
                     predicted_labels=np.array(list(self.predicted), dtype=str),
                     predicted_counts=np.array(list(self.predicted.values()), dtype=np.int64),
                     gallery_labels=np.array(list(self.gallery), dtype=str),
                     gallery_counts=np.array(list(self.gallery.values()), dtype=np.int64),
                     embeddings=self.embeddings.astype(np.float16))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceProfile:
        """Read a profile written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            threshold = float(data["threshold"])
            return cls(data["nearest_distances"], data["unknown_scores"], None if np.isnan(threshold) else threshold,
                       dict(zip(data["predicted_labels"].tolist(), data["predicted_counts"].tolist())),
                       dict(zip(data["gallery_labels"].tolist(), data["gallery_counts"].tolist())),
                       data["embeddings"])


def reference_profile(assessment, recognizer, seed: int = 0) -> ReferenceProfile:
    """The profile of an :class:`~siamese_core.evaluation.Assessment` of ``recognizer`` on its test split."""
    from .openset import unknown_scores

    calibration = assessment.report.calibration
    matches, queries = assessment.matches, assessment.queries
    scores = (unknown_scores(calibration.score, recognizer.gallery, queries, matches)
              if calibration is not None else np.zeros(0))
    picked = np.random.default_rng(seed).permutation(len(queries))[:EMBEDDING_SAMPLE]
    gallery = recognizer.gallery
    return ReferenceProfile(
        nearest_distances=assessment.nearest_distances, unknown_scores=np.asarray(scores),
        threshold=None if calibration is None else calibration.threshold,
        predicted=dict(Counter(m.label for m in matches)),
        gallery={name: int(n) for name, n in zip(gallery.class_names, np.bincount(gallery.labels,
                                                                                  minlength=len(gallery.class_names)))},
        embeddings=queries[np.sort(picked)])
