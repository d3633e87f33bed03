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

from .augment import add_transformed_classes, augmentation_layers
from .config import Config, TrainConfig
from .data import ImageFolder, scan_folder
from .embed import decode_all, embed_images, predict_array
from .errors import ConfigError, DatasetError
from .io import atomic_dir, ensure_writable
from .model import (
    SiameseModel,
    UniqueTripletModel,
    build_embedding_model,
    split_frozen_trunk,
)
from .online import (
    CollapseGuard,
    FewShotEvaluation,
    OnlineTripletModel,
    pk_batches,
    pk_dataset,
    pk_epochs,
)
from .triplets import COLUMNS as TRIPLET_COLUMNS
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
    """Remember the embedding weights of the epoch with the lowest monitored loss and restore them.

    With ``monitor=None`` the last epoch is kept: online mining losses average over the
    triplets that are still active, so they do not fall as the embedding improves.
    """

    def __init__(self, embedding: keras.Model, monitor: str | None = "val_loss"):
        super().__init__()
        self.embedding, self.monitor = embedding, monitor
        self.best, self.best_epoch, self.best_weights = np.inf, 0, None

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            self.best_epoch = epoch + 1
            return
        logs = logs or {}
        value = logs.get(self.monitor, logs.get("loss"))
        if value is not None and value < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.embedding.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.embedding.set_weights(self.best_weights)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, save what ``--resume`` needs to carry on: the weights with the
    optimizer state, the history so far and the best epoch's weights (atomically, as .npz)."""

    STATE, WEIGHTS, BEST = "state.json", "weights.npz", "best.npz"

    def __init__(self, directory: Path, keep_best: KeepBestWeights, history: dict[str, list[float]]):
        super().__init__()
        self.directory, self.keep_best, self.history = Path(directory), keep_best, history

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        with atomic_dir(self.directory) as tmp:
            np.savez(tmp / self.WEIGHTS, *[np.asarray(v) for v in _saved_variables(self.model)])
            if self.keep_best.best_weights is not None:
                np.savez(tmp / self.BEST, *self.keep_best.best_weights)
            state = {"epoch": epoch + 1, "history": self.history, "best": self.keep_best.best,
                     "best_epoch": self.keep_best.best_epoch}
            (tmp / self.STATE).write_text(json.dumps(state), encoding="utf-8")

    @classmethod
    def saved_epochs(cls, directory: Path) -> int:
        """How many epochs the checkpoint in ``directory`` holds."""
        state_file = Path(directory) / cls.STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: no checkpoint to resume from (train without --resume)")
        return json.loads(state_file.read_text(encoding="utf-8"))["epoch"]

    @classmethod
    def restore(cls, directory: Path, model: keras.Model, keep_best: KeepBestWeights) -> tuple[int, dict]:
        """Load a checkpoint into a compiled model; returns (epochs done, history so far)."""
        state = json.loads((Path(directory) / cls.STATE).read_text(encoding="utf-8"))
        model.optimizer.build(model.embedding.trainable_variables)
        variables = _saved_variables(model)
        arrays = _load_arrays(Path(directory) / cls.WEIGHTS)
        if [a.shape for a in arrays] != [tuple(v.shape) for v in variables]:  # another architecture
            raise ConfigError(f"{directory}: the checkpoint was written by a run with another model config, so it "
                              "cannot resume this one; use the same config, or train without --resume")
        for variable, array in zip(variables, arrays):
            variable.assign(array)
        if (Path(directory) / cls.BEST).is_file():
            keep_best.best_weights = _load_arrays(Path(directory) / cls.BEST)
        keep_best.best, keep_best.best_epoch = state["best"], state["best_epoch"]
        return state["epoch"], state["history"]


def _saved_variables(model: keras.Model) -> list:
    """What a checkpoint holds, in a fixed order: the model's weights, then the optimizer's state."""
    return [*model.weights, *model.optimizer.variables]


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """The learning rate or schedule of the config, in optimizer steps."""
    total = max(1, steps_per_epoch * config.epochs)
    if config.lr_schedule == "cosine":
        warmup = steps_per_epoch * config.warmup_epochs
        return keras.optimizers.schedules.CosineDecay(
            config.learning_rate * (0.1 if warmup else 1.0), max(1, total - warmup), alpha=0.01,
            warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup,
        )
    if config.lr_schedule == "step":
        boundaries = [max(1, total // 2), max(2, total * 3 // 4)]
        values = [config.learning_rate * f for f in (1.0, 0.1, 0.01)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return config.learning_rate


def make_optimizer(config: TrainConfig, steps_per_epoch: int = 1) -> keras.optimizers.Optimizer:
    """The optimizer named in the config, with its learning-rate schedule and weight decay."""
    optimizers = {"adam": keras.optimizers.AdamW if config.weight_decay else keras.optimizers.Adam,
                  "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    return optimizers[config.optimizer](learning_rate=learning_rate(config, steps_per_epoch), **decay)


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
    images: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None, augment=None
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
    if augment is not None:
        dataset = dataset.map(lambda a, p, n: tuple(augment(t, training=True) for t in (a, p, n)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def unique_triplet_dataset(
    inputs: np.ndarray, index: np.ndarray, batch_size: int, shuffle_seed: int | None, augment=None
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
    if augment is not None:
        dataset = dataset.map(lambda x, i: (augment(x, training=True), i))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _index_triplets(table: pd.DataFrame, positions: dict[str, int]) -> np.ndarray:
    try:
        return np.array(
            [[positions[p] for p in row] for row in table[["anchor", "positive", "negative"]].itertuples(index=False)],
            dtype=np.int64,
        )
    except KeyError as exc:
        raise DatasetError(f"triplet table names an image that is not in the dataset: {exc.args[0]}") from None


@dataclass
class _Plan:
    """What the training loop runs: the model to fit, how to turn images into its
    per-image inputs, how to batch them (triplet rows, or P x K rows online) and a
    one-row sample input that builds the model."""

    model: keras.Model
    prepare: Callable[[np.ndarray], np.ndarray]
    dataset: Callable[..., tf.data.Dataset]
    sample: Callable[[np.ndarray], tuple]


def _plan(config: Config, embedding: keras.Model) -> _Plan:
    """The fast paths the config asks for: a cached frozen trunk (not with augmentation,
    which must see images) and distinct-image batches."""
    cache = config.train.cache_frozen_features and not config.train.augment.active
    trunk, top = split_frozen_trunk(embedding) if cache else (None, embedding)

    def prepare(images: np.ndarray) -> np.ndarray:
        return images if trunk is None else predict_array(trunk, images, config.evaluate.embed_batch_size)

    if config.train.mining != "offline":
        model = OnlineTripletModel(top, config.train.mining, config.model.margin)
        return _Plan(model, prepare, pk_dataset, lambda x: x)
    if config.train.unique_batch_images:
        model = UniqueTripletModel(top, margin=config.model.margin)
        return _Plan(model, prepare, unique_triplet_dataset, lambda x: (x, np.zeros((1, 3), np.int64)))
    return _Plan(SiameseModel(top, margin=config.model.margin), prepare, triplet_dataset, lambda x: (x, x, x))


def _offline_data(config, plan, folder, inputs, triplets, test):
    """Triplet-table batches for training, and for validation when the test folder allows."""
    augment = _augmenter(config)
    batch = config.train.batch_size
    train_index = _index_triplets(triplets, {p: i for i, p in enumerate(folder.paths)})
    train_data = plan.dataset(inputs, train_index, batch, shuffle_seed=config.train.seed, augment=augment)
    if test is None:
        return train_data, None, None
    test_folder, test_inputs = test
    try:
        val_table = generate_triplets(test_folder, "random", max_pairs_per_class=config.triplets.max_pairs_per_class,
                                      seed=config.train.seed)
    except ValueError as exc:
        log.warning("no validation triplets: %s", exc)
        return train_data, None, None
    val_index = _index_triplets(val_table, {p: i for i, p in enumerate(test_folder.paths)})
    return train_data, plan.dataset(test_inputs, val_index, batch, shuffle_seed=None), None


def _online_data(config, inputs, labels, test, done: int):
    """P x K batches for the remaining epochs (drawn lazily), validation batches, and the steps per epoch."""
    p, k = config.train.classes_per_batch, config.train.images_per_class
    steps = config.train.steps_per_epoch or max(1, -(-len(inputs) // (p * k)))
    pk_batches(labels, p, k, 0, seed=0)  # fail now, not inside tf.data, when no batch can be drawn
    train_data = pk_dataset(
        inputs, labels, lambda: pk_epochs(labels, p, k, steps, config.train.seed, done, config.train.epochs),
        steps * (config.train.epochs - done), augment=_augmenter(config))
    validation = None
    if test is not None:
        test_folder, test_inputs = test
        try:
            val_rows = pk_batches(test_folder.labels, p, k, max(1, -(-len(test_inputs) // (p * k))), seed=0)
        except ValueError as exc:
            log.warning("no validation batches: %s", exc)
        else:
            validation = pk_dataset(test_inputs, test_folder.labels, lambda: iter(val_rows), len(val_rows))
    return train_data, validation, steps


def _augmenter(config: Config):
    a = config.train.augment
    return augmentation_layers(a.rotation, a.shift, a.zoom, a.shear, a.flip, seed=config.train.seed) if a.active else None


def train(
    config: Config,
    train_dir,
    test_dir=None,
    triplets: pd.DataFrame | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    heldout_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train an embedding model with triplet loss; returns it with its loss history.

    ``train.mining`` chooses the batches: ``offline`` trains on the triplet table
    (given, or generated with ``triplets.strategy``); ``batch_all``, ``batch_hard``
    or ``semihard`` sample P classes x K images per batch and mine inside it
    (``triplets`` is then only a record). Validation batches come from ``test_dir``
    when it has a class with two images; offline, the weights of the epoch with the lowest
    validation loss are kept, online the last epoch's. ``train.augment`` transforms training batches on the fly.
    With ``heldout_dir`` (classes never trained on), every epoch logs its N-way
    one-shot accuracy (``fewshot_<N>way_1shot``).
    With ``checkpoint_dir`` every epoch is checkpointed there, and ``resume`` carries
    on from the last checkpoint (same config and data give the same batches).
    With ``train.cache_frozen_features`` the frozen backbone layers run once per image
    and only the layers after them train; with ``train.unique_batch_images`` each
    distinct image of a triplet batch is embedded once. ``embedding`` is always the full model.
    """
    if checkpoint_dir is not None:
        ensure_writable(Path(checkpoint_dir).parent, "checkpoints")
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    online = config.train.mining != "offline"
    new_classes = config.train.augment.rotations_as_classes or config.train.augment.mirrors_as_classes
    if new_classes and not online:
        raise ConfigError("train.augment.rotations_as_classes and mirrors_as_classes need online mining (train.mining)")
    folder = scan_folder(train_dir)
    embedding = build_embedding_model(config.model)
    size = config.model.input_size
    plan = _plan(config, embedding)
    images, labels = decode_all(folder.paths, size), folder.labels
    if new_classes:
        images, labels, _ = add_transformed_classes(images, labels, folder.class_names,
                                                    rotations=config.train.augment.rotations_as_classes,
                                                    mirrors=config.train.augment.mirrors_as_classes)
    inputs = plan.prepare(images)
    del images
    if triplets is None:
        if online:
            triplets = pd.DataFrame(columns=TRIPLET_COLUMNS)
        else:  # mining embeds the already decoded (and trunk-cached) images
            mined = None if config.triplets.strategy == "random" else predict_array(
                plan.model.embedding, inputs, config.evaluate.embed_batch_size)
            triplets = mine_triplets(config, folder, embeddings=mined)
    test = None
    if test_dir is not None:
        test_folder = scan_folder(test_dir)
        test = (test_folder, plan.prepare(decode_all(test_folder.paths, size)))

    model = plan.model
    keep_best = KeepBestWeights(embedding)
    done, history = 0, {}
    if resume and checkpoint_dir is not None:
        done = EpochCheckpoint.saved_epochs(Path(checkpoint_dir))
    if online:
        train_data, validation, steps = _online_data(config, inputs, labels, test, done)
    else:
        train_data, validation, steps = _offline_data(config, plan, folder, inputs, triplets, test)
    keep_best.monitor = None if online else "val_loss" if validation is not None else "loss"
    model.compile(optimizer=make_optimizer(config.train, steps or -(-len(triplets) // config.train.batch_size)))
    model(plan.sample(np.zeros((1, *inputs.shape[1:]), np.float32)))  # build before fitting or loading
    if done:
        done, history = EpochCheckpoint.restore(Path(checkpoint_dir), model, keep_best)
        log.info("resuming from epoch %d of %d", done, config.train.epochs)
    # order matters: few-shot adds to the logs, keep_best updates before the checkpoint saves
    steps_callbacks: list[keras.callbacks.Callback] = []
    if heldout_dir is not None:
        heldout = scan_folder(heldout_dir)
        steps_callbacks.append(FewShotEvaluation(embedding, decode_all(heldout.paths, size), heldout.labels,
                                                 n_way=config.evaluate.fewshot_way))
    steps_callbacks.append(keep_best)
    if checkpoint_dir is not None:
        steps_callbacks.append(EpochCheckpoint(Path(checkpoint_dir), keep_best, history))
    if online:
        steps_callbacks.append(CollapseGuard(config.train.collapse_min_gap, config.train.collapse_patience,
                                             margin=config.model.margin))
    fitted = model.fit(
        train_data,
        validation_data=validation,
        epochs=config.train.epochs,
        initial_epoch=done,
        steps_per_epoch=steps,
        callbacks=[*steps_callbacks, *(callbacks or [])],
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
    )
    if checkpoint_dir is None:
        history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    return TrainResult(embedding, history, triplets, keep_best.best_epoch, folder)
