"""Squared Euclidean distance in ``keras.ops``: the same figure as ``distance.squared_distances``, inside
train steps (the triplet loss and in-batch mining)."""

from __future__ import annotations

from keras import ops


def pairwise_squared_distances(embeddings):
    """All squared distances ``(n, n)`` within one batch of embeddings (keras.ops), clipped at zero."""
    embeddings = ops.cast(embeddings, "float32")
    norms = ops.sum(ops.square(embeddings), axis=1)
    dot = ops.matmul(embeddings, ops.transpose(embeddings))
    return ops.maximum(norms[:, None] - 2.0 * dot + norms[None, :], 0.0)


def row_squared_distances(a, b):
    """The squared distance of each row of ``a`` to the same row of ``b``, ``(n,)`` (keras.ops)."""
    return ops.sum(ops.square(a - b), axis=-1)
