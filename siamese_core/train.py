"""Training the Siamese network on a triplet table, through tf.data."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from .config import Config, TrainConfig
from .data import ImageFolder, scan_folder
from .embed import decode_all, embed_images, predict_array
from .io import atomic_dir
from .model import (
    SiameseModel,
    UniqueTripletModel,
    build_embedding_model,
    split_frozen_trunk,
)
from .triplets import generate_triplets

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training returns: the trained embedding model and the per-epoch history."""

    embedding: keras.Model
    history: dict[str, list[float]]
    triplets: pd.DataFrame
    best_epoch: int
    train_folder: ImageFolder
    extra: dict = field(default_factory=dict)


class KeepBestWeights(keras.callbacks.Callback):
    """Remember the embedding weights of the epoch with the lowest monitored loss and restore them."""

    def __init__(self, embedding: keras.Model, monitor: str = "val_loss"):
        super().__init__()
        self.embedding, self.monitor = embedding, monitor
        self.best, self.best_epoch, self.best_weights = np.inf, 0, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor, logs.get("loss"))
        if value is not None and value < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.embedding.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.embedding.set_weights(self.best_weights)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, save what ``--resume`` needs to carry on: weights with the
    optimizer state, the history so far and the best epoch's weights (atomically)."""

    STATE, WEIGHTS, BEST = "state.json", "siamese.weights.h5", "best.npz"

    def __init__(self, directory: Path, keep_best: KeepBestWeights, history: dict[str, list[float]]):
        super().__init__()
        self.directory, self.keep_best, self.history = Path(directory), keep_best, history

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        with atomic_dir(self.directory) as tmp:
            self.model.save_weights(tmp / self.WEIGHTS)
            if self.keep_best.best_weights is not None:
                np.savez(tmp / self.BEST, *self.keep_best.best_weights)
            state = {"epoch": epoch + 1, "history": self.history, "best": self.keep_best.best,
                     "best_epoch": self.keep_best.best_epoch}
            (tmp / self.STATE).write_text(json.dumps(state), encoding="utf-8")

    @classmethod
    def restore(cls, directory: Path, model: keras.Model, keep_best: KeepBestWeights) -> tuple[int, dict]:
        """Load a checkpoint into a compiled model; returns (epochs done, history so far)."""
        state_file = Path(directory) / cls.STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: no checkpoint to resume from (train without --resume)")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        model.optimizer.build(model.embedding.trainable_variables)
        model.load_weights(Path(directory) / cls.WEIGHTS)
        if (Path(directory) / cls.BEST).is_file():
            with np.load(Path(directory) / cls.BEST) as best:
                keep_best.best_weights = [best[f"arr_{i}"] for i in range(len(best.files))]
        keep_best.best, keep_best.best_epoch = state["best"], state["best_epoch"]
        return state["epoch"], state["history"]


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """The optimizer named in the config, at its learning rate."""
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    return optimizers[config.optimizer](learning_rate=config.learning_rate)


def mine_triplets(
    config: Config, folder: ImageFolder, embedding: keras.Model | None = None, embeddings: np.ndarray | None = None
) -> pd.DataFrame:
    """Generate the training triplet table; hard and semi-hard mining embed each image once
    (or use ``embeddings``, one row per image of ``folder``, when given)."""
    if config.triplets.strategy != "random" and embeddings is None:
        embedding = embedding or build_embedding_model(config.model)
        embeddings = embed_images(embedding, folder.paths, config.evaluate.embed_batch_size)
    return generate_triplets(
        folder,
        config.triplets.strategy,
        embeddings=embeddings,
        margin=config.model.margin,
        max_pairs_per_class=config.triplets.max_pairs_per_class,
        seed=config.train.seed,
    )


def triplet_dataset(
    images: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None
) -> tf.data.Dataset:
    """A tf.data pipeline of (anchor, positive, negative) float32 batches.

    ``images`` is the decoded-once cache of every image; batches gather from it by
    index, so no image is decoded twice, and batches are prefetched while the model trains.
    """

    def gather(batch_index: np.ndarray):
        return tuple(images[batch_index[:, i]].astype(np.float32) for i in range(3))

    shape = (None, *images.shape[1:])
    dataset = tf.data.Dataset.from_tensor_slices(index.astype(np.int64))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(index), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(
        lambda i: tf.numpy_function(gather, [i], (tf.float32,) * 3), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.map(lambda a, p, n: tuple(tf.ensure_shape(t, shape) for t in (a, p, n)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def unique_triplet_dataset(
    inputs: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None
) -> tf.data.Dataset:
    """A tf.data pipeline of ``(distinct inputs, (b, 3) rows into them)`` batches.

    ``inputs`` holds one row per image (decoded pixels or frozen-trunk features); each
    batch carries every image its triplets use exactly once, for :class:`UniqueTripletModel`.
    """

    def gather(batch_index: np.ndarray):
        rows, inverse = np.unique(batch_index, return_inverse=True)
        return inputs[rows].astype(np.float32), inverse.reshape(-1, 3).astype(np.int64)

    shape = (None, *inputs.shape[1:])
    dataset = tf.data.Dataset.from_tensor_slices(index.astype(np.int64))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(index), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(
        lambda i: tf.numpy_function(gather, [i], (tf.float32, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.map(lambda x, i: (tf.ensure_shape(x, shape), tf.ensure_shape(i, (None, 3))))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _index_triplets(table: pd.DataFrame, positions: dict[str, int]) -> np.ndarray:
    try:
        return np.array(
            [[positions[p] for p in row] for row in table[["anchor", "positive", "negative"]].itertuples(index=False)],
            dtype=np.int64,
        )
    except KeyError as exc:
        raise ValueError(f"triplet table names an image that is not in the dataset: {exc.args[0]}") from None


@dataclass
class _Plan:
    """What the training loop runs: the model to fit, how to turn images into its
    per-image inputs, and how to batch triplets over those inputs."""

    model: SiameseModel
    prepare: Callable[[np.ndarray], np.ndarray]
    dataset: Callable[..., tf.data.Dataset]
    sample: Callable[[np.ndarray], tuple]


def _plan(config: Config, embedding: keras.Model) -> _Plan:
    """The fast paths the config asks for: a cached frozen trunk and distinct-image batches."""
    trunk, top = split_frozen_trunk(embedding) if config.train.cache_frozen_features else (None, embedding)

    def prepare(images: np.ndarray) -> np.ndarray:
        return images if trunk is None else predict_array(trunk, images, config.evaluate.embed_batch_size)

    if config.train.unique_batch_images:
        model = UniqueTripletModel(top, margin=config.model.margin)
        return _Plan(model, prepare, unique_triplet_dataset, lambda x: (x, np.zeros((1, 3), np.int64)))
    return _Plan(SiameseModel(top, margin=config.model.margin), prepare, triplet_dataset, lambda x: (x, x, x))


def train(
    config: Config,
    train_dir,
    test_dir=None,
    triplets: pd.DataFrame | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train an embedding model with triplet loss; returns it with its loss history.

    Validation triplets (random, seeded) come from ``test_dir`` when it has a class
    with two images. The weights of the epoch with the lowest validation loss are kept.
    With ``checkpoint_dir`` every epoch is checkpointed there, and ``resume`` carries
    on from the last checkpoint (same config and data give the same triplets).
    With ``train.cache_frozen_features`` the frozen backbone layers run once per image
    and only the layers after them train; with ``train.unique_batch_images`` each
    distinct image of a batch is embedded once. ``embedding`` is always the full model.
    """
    keras.utils.set_random_seed(config.train.seed)
    folder = scan_folder(train_dir)
    embedding = build_embedding_model(config.model)
    size, batch = config.model.input_size, config.train.batch_size
    plan = _plan(config, embedding)
    inputs = plan.prepare(decode_all(folder.paths, size))
    if triplets is None:  # mining embeds the already decoded (and trunk-cached) images
        mined = None if config.triplets.strategy == "random" else predict_array(
            plan.model.embedding, inputs, config.evaluate.embed_batch_size)
        triplets = mine_triplets(config, folder, embeddings=mined)
    train_index = _index_triplets(triplets, {p: i for i, p in enumerate(folder.paths)})
    train_data = plan.dataset(inputs, train_index, batch, shuffle_seed=config.train.seed)

    validation = None
    if test_dir is not None:
        test_folder = scan_folder(test_dir)
        try:
            val_table = generate_triplets(test_folder, "random", seed=config.train.seed)
        except ValueError as exc:
            log.warning("no validation triplets: %s", exc)
        else:
            val_inputs = plan.prepare(decode_all(test_folder.paths, size))
            val_index = _index_triplets(val_table, {p: i for i, p in enumerate(test_folder.paths)})
            validation = plan.dataset(val_inputs, val_index, batch, shuffle_seed=None)

    model = plan.model
    model.compile(optimizer=make_optimizer(config.train))
    model(plan.sample(np.zeros((1, *inputs.shape[1:]), np.float32)))  # build before fitting or loading
    keep_best = KeepBestWeights(embedding, "val_loss" if validation is not None else "loss")
    done, history = 0, {}
    if resume and checkpoint_dir is not None:
        done, history = EpochCheckpoint.restore(Path(checkpoint_dir), model, keep_best)
        log.info("resuming from epoch %d of %d", done, config.train.epochs)
    extra = [EpochCheckpoint(Path(checkpoint_dir), keep_best, history)] if checkpoint_dir is not None else []
    fitted = model.fit(
        train_data,
        validation_data=validation,
        epochs=config.train.epochs,
        initial_epoch=done,
        callbacks=[keep_best, *extra, *(callbacks or [])],
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
    )
    if not extra:
        history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    return TrainResult(embedding, history, triplets, keep_best.best_epoch, folder)

