"""Straightforward reference implementations, written the way the original code worked.

They are what the library's figures are compared against: one image per forward
pass, Python loops over pairs, and training with three separate forward passes
(anchor, positive, negative) through the whole network, with no feature cache.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import tensorflow as tf

from siamese_core.data import decode_image
from siamese_core.model import triplet_loss


def embed_one_by_one(model, paths: list[str], size: int) -> np.ndarray:
    """Decode and embed each image on its own."""
    return np.stack([model.predict(decode_image(p, size)[None].astype(np.float32), verbose=0)[0] for p in paths])


def hard_triplets_pair_by_pair(labels: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """For every same-class pair, the other-class image whose d(A,N) is closest to d(A,P), one pair at a time."""
    rows = []
    for label in np.unique(labels):
        members = [int(i) for i in np.flatnonzero(labels == label)]
        others = [int(i) for i in np.flatnonzero(labels != label)]
        for a, p in combinations(members, 2):
            ap = float(np.sum((embeddings[a] - embeddings[p]) ** 2))
            best, best_gap = others[0], np.inf
            for n in others:
                gap = abs(float(np.sum((embeddings[a] - embeddings[n]) ** 2)) - ap)
                if gap < best_gap:
                    best, best_gap = n, gap
            rows.append((a, p, best))
    return np.array(rows, dtype=np.int64)


def three_pass_trainer(embedding, optimizer, margin: float):
    """A compiled training step that embeds anchor, positive and negative in three separate passes."""
    variables = embedding.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(anchor, positive, negative):
        with tf.GradientTape() as tape:
            a = embedding(anchor, training=True)
            p = embedding(positive, training=True)
            n = embedding(negative, training=True)
            ap, an = tf.reduce_sum(tf.square(a - p), -1), tf.reduce_sum(tf.square(a - n), -1)
            loss = tf.reduce_mean(triplet_loss(ap, an, margin))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def nearest_one_by_one(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    """The label of the nearest gallery row, comparing one row at a time."""
    best, best_label = np.inf, -1
    for row, label in zip(gallery, labels):
        distance = float(np.sum((query - row) ** 2))
        if distance < best:
            best, best_label = distance, int(label)
    return best_label, best
