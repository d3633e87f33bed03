"""Squared Euclidean distance, the one distance of the project, in NumPy: searches and evaluation.

``distance_ops`` computes the same figure with ``keras.ops`` inside train steps; it lives apart so that
the registry, monitoring and the CLI's light commands use this form without loading TensorFlow. The tests
hold the forms against each other and against a plain loop.
"""

from __future__ import annotations

import numpy as np


def squared_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """All squared distances ``(q, n)`` between two sets of row vectors, as one matrix product (NumPy)."""
    queries = np.asarray(queries, dtype=np.float32)
    references = np.asarray(references, dtype=np.float32)
    q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    r_norms = np.einsum("ij,ij->i", references, references)[None, :]
    return np.maximum(q_norms + r_norms - 2.0 * queries @ references.T, 0.0)
