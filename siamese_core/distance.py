"""Squared Euclidean distance, the one distance of the project.

A NumPy form answers searches and evaluation; the ``keras.ops`` forms compute the
same figure inside train steps (the triplet loss and in-batch mining). The tests hold
the forms against each other and against a plain loop.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def squared_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """All squared distances ``(q, n)`` between two sets of row vectors, as one matrix product (NumPy)."""
    queries = np.asarray(queries, dtype=np.float32)
    references = np.asarray(references, dtype=np.float32)
    q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    r_norms = np.einsum("ij,ij->i", references, references)[None, :]
    return np.maximum(q_norms + r_norms - 2.0 * queries @ references.T, 0.0)


def pairwise_squared_distances(embeddings):
    """All squared distances ``(n, n)`` within one batch of embeddings (keras.ops), clipped at zero."""
    embeddings = ops.cast(embeddings, "float32")
    norms = ops.sum(ops.square(embeddings), axis=1)
    dot = ops.matmul(embeddings, ops.transpose(embeddings))
    return ops.maximum(norms[:, None] - 2.0 * dot + norms[None, :], 0.0)


def row_squared_distances(a, b):
    """The squared distance of each row of ``a`` to the same row of ``b``, ``(n,)`` (keras.ops)."""
    return ops.sum(ops.square(a - b), axis=-1)
