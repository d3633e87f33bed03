"""Online mining: batches of P classes x K images, triplets formed inside each batch.

Each distinct image is embedded once per step; the loss comes from
``siamese_core.mining``. Augmentation runs on the batches in tf.data, so nothing
is ever written to disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from .embed import predict_array
from .errors import ConfigError, DatasetError
from .metrics import few_shot_accuracy
from .mining import LOSSES, mean_pair_distances

log = logging.getLogger(__name__)


class OnlineTripletModel(keras.Model):
    """Trains an embedding model on (images, labels) batches with an in-batch mining loss."""

    def __init__(self, embedding: keras.Model, strategy: str, margin: float, **kwargs):
        super().__init__(**kwargs)
        if strategy not in LOSSES:
            raise ConfigError(f"unknown online mining strategy '{strategy}', expected one of {sorted(LOSSES)}")
        self.embedding, self.strategy, self.margin = embedding, strategy, margin
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.positive_tracker = keras.metrics.Mean(name="pos_dist")
        self.negative_tracker = keras.metrics.Mean(name="neg_dist")

    def call(self, images, training=False):
        return self.embedding(images, training=training)

    def _step(self, images, labels, training: bool):
        embeddings = self(images, training=training)
        loss = LOSSES[self.strategy](labels, embeddings, self.margin)
        positive, negative = mean_pair_distances(labels, embeddings)
        return loss, positive, negative

    def _track(self, loss, positive, negative):
        self.loss_tracker.update_state(loss)
        self.positive_tracker.update_state(positive)
        self.negative_tracker.update_state(negative)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        images, labels = data
        with tf.GradientTape() as tape:
            loss, positive, negative = self._step(images, labels, training=True)
        variables = self.embedding.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._track(loss, positive, negative)

    def test_step(self, data):
        return self._track(*self._step(*data, training=False))

    @property
    def metrics(self):
        return [self.loss_tracker, self.positive_tracker, self.negative_tracker]


def pk_batches(labels: np.ndarray, classes_per_batch: int, images_per_class: int, steps: int,
               seed: int | Sequence[int]) -> np.ndarray:
    """``(steps, P*K)`` image indices: each row P distinct classes with K images each.

    Classes with fewer than K images repeat images; classes with one image are never drawn.
    """
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    members = [m for m in members if len(m) >= 2]
    if len(members) < 2:
        raise DatasetError("online mining needs at least two classes with two images")
    p = min(classes_per_batch, len(members))
    rows = np.empty((steps, p * images_per_class), dtype=np.int64)
    for step in range(steps):
        chosen = rng.choice(len(members), size=p, replace=False)
        rows[step] = np.concatenate([
            rng.choice(members[c], size=images_per_class, replace=len(members[c]) < images_per_class) for c in chosen
        ])
    return rows


def pk_epochs(labels: np.ndarray, classes_per_batch: int, images_per_class: int, steps: int, seed: int,
              first_epoch: int, epochs: int) -> Iterator[np.ndarray]:
    """The P x K rows of epochs ``first_epoch`` to ``epochs - 1``, one epoch drawn at a time.

    Epoch e is drawn from the seed ``(seed, e)`` alone, so a run resumed at epoch e gets
    the batches an uninterrupted run would have, and no epoch is built before it is trained.
    """
    for epoch in range(first_epoch, epochs):
        yield from pk_batches(labels, classes_per_batch, images_per_class, steps, seed=(seed, epoch))


def pk_dataset(images: np.ndarray, labels: np.ndarray, rows: Callable[[], Iterable[np.ndarray]], count: int,
               augment=None) -> tf.data.Dataset:
    """A tf.data pipeline of (float32 images, labels) batches, one per P x K index row of the
    ``count`` that ``rows()`` yields (called anew for each pass), transformed by ``augment``
    (a Keras layer) when given."""

    def gather(batch_rows):
        return images[batch_rows].astype(np.float32), labels[batch_rows].astype(np.int32)

    shape = (None, *images.shape[1:])
    rows_dataset = tf.data.Dataset.from_generator(rows, output_signature=tf.TensorSpec((None,), tf.int64))
    dataset = rows_dataset.apply(tf.data.experimental.assert_cardinality(count)).map(
        lambda batch_rows: tf.numpy_function(gather, [batch_rows], (tf.float32, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.map(lambda x, y: (tf.ensure_shape(x, shape), tf.ensure_shape(y, (None,))))
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


class FewShotEvaluation(keras.callbacks.Callback):
    """After each epoch, N-way k-shot accuracy on held-out classes, added to the epoch's logs."""

    def __init__(self, embedding: keras.Model, images: np.ndarray, labels: np.ndarray,
                 n_way: int = 20, k_shot: int = 1, episodes: int = 200, batch_size: int = 256):
        super().__init__()
        self.embedding, self.images, self.labels = embedding, images, labels
        self.n_way = min(n_way, len(np.unique(labels)))
        self.k_shot, self.episodes, self.batch_size = k_shot, episodes, batch_size
        self.key = f"fewshot_{self.n_way}way_{k_shot}shot"

    def on_epoch_end(self, epoch, logs=None):
        embeddings = predict_array(self.embedding, self.images, self.batch_size)
        result = few_shot_accuracy(embeddings, self.labels, self.n_way, self.k_shot, self.episodes, seed=0)
        if logs is not None:
            logs[self.key] = result["mean"]


class CollapseGuard(keras.callbacks.Callback):
    """Warns, then stops training, when same-class and other-class distances converge.

    The signal is the gap neg_dist - pos_dist on the training batches, relative to
    neg_dist and to the margin: below ``min_gap`` of either for ``patience`` epochs
    in a row means the embedding has collapsed. The margin term catches the usual
    failure, every image mapped to nearly one point with the loss stuck at the margin,
    where both distances shrink together and their ratio alone stays unremarkable.
    """

    def __init__(self, min_gap: float = 0.05, patience: int = 2, margin: float = 1.0):
        super().__init__()
        self.min_gap, self.patience, self.margin, self.low_epochs = min_gap, patience, margin, 0
        self.collapsed_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "pos_dist" not in logs or "neg_dist" not in logs:
            return
        difference = logs["neg_dist"] - logs["pos_dist"]
        gap = min(difference / max(logs["neg_dist"], 1e-12), difference / self.margin)
        self.low_epochs = self.low_epochs + 1 if gap < self.min_gap else 0
        if self.low_epochs:
            log.warning("epoch %d: embedding collapsing (distance gap %.3g < %.3g; neg %.3g, pos %.3g, margin %g)",
                        epoch + 1, gap, self.min_gap, logs["neg_dist"], logs["pos_dist"], self.margin)
        if self.low_epochs >= self.patience:
            self.collapsed_at = epoch + 1
            log.warning("stopping: positive and negative distances converged for %d epochs", self.patience)
            self.model.stop_training = True
