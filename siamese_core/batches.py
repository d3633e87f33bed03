"""Training batches as tf.data pipelines: triplet rows, distinct-image triplet rows, and P x K rows
for online mining. All three gather from the decoded-once images (or cached trunk features) by
index, through one helper that restores the shapes, augments and prefetches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from .distribute import worker_slice
from .errors import DatasetError


def _gathered(rows: tf.data.Dataset, gather: Callable, dtypes: tuple, shapes: tuple, augment=None,
              image_parts: int = 1) -> tf.data.Dataset:
    """Batches gathered from NumPy by ``gather(rows)``, their shapes restored, the first
    ``image_parts`` parts (the images) transformed by ``augment`` (a Keras layer) when given,
    and prefetched while the model trains."""
    worker, workers = worker_slice()
    if workers > 1:  # multi-worker training: this process takes its slice of every global batch
        rows = rows.map(lambda index: index[worker::workers])
    options = tf.data.Options()  # ... and no other sharding: each worker reads the same batches
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    rows = rows.with_options(options)
    dataset = rows.map(lambda index: tf.numpy_function(gather, [index], dtypes), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda *parts: tuple(tf.ensure_shape(p, s) for p, s in zip(parts, shapes)))
    if augment is not None:
        dataset = dataset.map(lambda *parts: tuple(augment(p, training=True) if i < image_parts else p
                                                   for i, p in enumerate(parts)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _index_batches(index: np.ndarray, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    rows = tf.data.Dataset.from_tensor_slices(index.astype(np.int64))
    if shuffle_seed is not None:
        rows = rows.shuffle(len(index), seed=shuffle_seed, reshuffle_each_iteration=True)
    return rows.batch(batch_size)


def triplet_dataset(images: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None,
                    augment=None) -> tf.data.Dataset:
    """``(anchor, positive, negative)`` float32 batches from ``(n, 3)`` rows of image indices."""
    shape = (None, *images.shape[1:])

    def gather(batch_index: np.ndarray):
        return tuple(images[batch_index[:, i]].astype(np.float32) for i in range(3))

    return _gathered(_index_batches(index, batch_size, shuffle_seed), gather, (tf.float32,) * 3, (shape,) * 3,
                     augment, image_parts=3)


def unique_triplet_dataset(inputs: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None,
                           augment=None) -> tf.data.Dataset:
    """``(distinct inputs, (b, 3) rows into them)`` batches: each image a batch's triplets use, once."""

    def gather(batch_index: np.ndarray):
        rows, inverse = np.unique(batch_index, return_inverse=True)
        return inputs[rows].astype(np.float32), inverse.reshape(-1, 3).astype(np.int64)

    return _gathered(_index_batches(index, batch_size, shuffle_seed), gather, (tf.float32, tf.int64),
                     ((None, *inputs.shape[1:]), (None, 3)), augment)


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
    """``(float32 images, labels)`` batches, one per P x K index row of the ``count`` that ``rows()``
    yields (called anew for each pass)."""

    def gather(batch_rows: np.ndarray):
        return images[batch_rows].astype(np.float32), labels[batch_rows].astype(np.int32)

    row_dataset = tf.data.Dataset.from_generator(rows, output_signature=tf.TensorSpec((None,), tf.int64))
    return _gathered(row_dataset.apply(tf.data.experimental.assert_cardinality(count)), gather,
                     (tf.float32, tf.int32), ((None, *images.shape[1:]), (None,)), augment)
