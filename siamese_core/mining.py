"""Online triplet mining inside a batch of P classes x K images.

Every function takes the batch's integer labels ``(n,)`` and embeddings ``(n, d)``
and returns a scalar loss built from max(d(A,P) - d(A,N) + margin, 0) on squared
Euclidean distances. They use keras.ops only, so they run inside a train step and
on plain NumPy arrays alike.

- ``batch_all``: every valid triplet (a, p, n) of the batch, averaged over the
  triplets with a positive loss (Hermans et al., "In Defense of the Triplet Loss
  for Person Re-Identification", 2017).
- ``batch_hard``: for each anchor, its farthest positive and nearest negative
  (Hermans et al., 2017).
- ``semihard``: for each anchor-positive pair, the nearest negative farther than
  the positive (d(A,P) < d(A,N)); when none is, the farthest negative
  (Schroff et al., "FaceNet", 2015).
"""

from __future__ import annotations

from keras import ops

from .distance_ops import pairwise_squared_distances

STRATEGIES = ("batch_all", "batch_hard", "semihard")


def _masks(labels):
    labels = ops.reshape(labels, (-1,))
    same = ops.equal(labels[:, None], labels[None, :])
    not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(labels)[0]), "bool"))
    return ops.logical_and(same, not_self), ops.logical_not(same)


def batch_all_loss(labels, embeddings, margin: float):
    """Mean loss over the valid triplets whose loss is positive (0 when none is)."""
    distances = pairwise_squared_distances(embeddings)
    positive, negative = _masks(labels)
    losses = distances[:, :, None] - distances[:, None, :] + margin  # [a, p, n]
    valid = ops.logical_and(positive[:, :, None], negative[:, None, :])
    losses = ops.where(valid, ops.maximum(losses, 0.0), 0.0)
    active = ops.sum(ops.cast(losses > 1e-16, "float32"))
    return ops.sum(losses) / ops.maximum(active, 1.0)


def batch_hard_loss(labels, embeddings, margin: float):
    """Mean over anchors of max(farthest positive - nearest negative + margin, 0)."""
    distances = pairwise_squared_distances(embeddings)
    positive, negative = _masks(labels)
    hardest_positive = ops.max(ops.where(positive, distances, 0.0), axis=1)
    big = ops.max(distances) + 1.0
    hardest_negative = ops.min(ops.where(negative, distances, big), axis=1)
    has_both = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
    losses = ops.where(has_both, ops.maximum(hardest_positive - hardest_negative + margin, 0.0), 0.0)
    return ops.sum(losses) / ops.maximum(ops.sum(ops.cast(has_both, "float32")), 1.0)


def semihard_loss(labels, embeddings, margin: float):
    """Mean over anchor-positive pairs with the nearest negative beyond d(A,P), else the farthest."""
    distances = pairwise_squared_distances(embeddings)
    positive, negative = _masks(labels)
    ap = distances[:, :, None]  # [a, p, 1]
    an = distances[:, None, :]  # [a, 1, n]
    negative3 = negative[:, None, :]
    beyond = ops.logical_and(negative3, an > ap)
    big = ops.max(distances) + 1.0
    nearest_beyond = ops.min(ops.where(beyond, an, big), axis=2)
    farthest = ops.max(ops.where(negative3, an, 0.0), axis=2)
    chosen = ops.where(ops.any(beyond, axis=2), nearest_beyond, farthest)
    losses = ops.where(positive, ops.maximum(distances - chosen + margin, 0.0), 0.0)
    return ops.sum(losses) / ops.maximum(ops.sum(ops.cast(positive, "float32")), 1.0)


LOSSES = {"batch_all": batch_all_loss, "batch_hard": batch_hard_loss, "semihard": semihard_loss}


def mean_pair_distances(labels, embeddings):
    """Mean squared distance of same-class pairs and of different-class pairs (the collapse signal)."""
    distances = pairwise_squared_distances(embeddings)
    positive, negative = _masks(labels)
    pos = ops.sum(ops.where(positive, distances, 0.0)) / ops.maximum(ops.sum(ops.cast(positive, "float32")), 1.0)
    neg = ops.sum(ops.where(negative, distances, 0.0)) / ops.maximum(ops.sum(ops.cast(negative, "float32")), 1.0)
    return pos, neg
