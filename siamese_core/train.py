"""Training the embedding network with triplet loss, in four steps: plan the model and its fast
paths, prepare the data (decoded once), build the tf.data batches, fit."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from .augment import add_transformed_classes, augmentation_layers, random_views
from .batches import (
    pk_batches,
    pk_dataset,
    pk_epochs,
    triplet_dataset,
    unique_triplet_dataset,
)
from .callbacks import (
    CollapseGuard,
    EpochCheckpoint,
    FewShotEvaluation,
    KeepBestWeights,
    PreciseBatchNorm,
)
from .config import Config, TrainConfig
from .data import ImageFolder, folder_digest, scan_folder
from .distribute import is_chief, strategy_for
from .embed import decode_all, embed_images, predict_array
from .errors import ConfigError, DatasetError
from .io import ensure_writable
from .metrics import flatten, validation_warning
from .model import (
    OnlineTripletModel,
    SiameseModel,
    UniqueTripletModel,
    build_embedding_model,
    split_frozen_trunk,
)
from .seeding import seeded
from .triplets import COLUMNS as TRIPLET_COLUMNS
from .triplets import generate_triplets

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training returns: the trained embedding model, the per-epoch history, the triplet
    table (a record, empty for online mining), the epoch whose weights were kept, the training
    folder, the epoch at which a collapsing embedding stopped training (None if it did not), and
    why the kept epoch was kept."""

    embedding: keras.Model
    history: dict[str, list[float]]
    triplets: pd.DataFrame
    best_epoch: int
    train_folder: ImageFolder
    collapsed_at: int | None = None
    kept_because: str = ""


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
    """What the training loop runs: the model to fit, how to turn images into its per-image
    inputs, how to batch them, and a one-row sample input that builds the model."""

    model: keras.Model
    prepare: Callable[[np.ndarray], np.ndarray]
    dataset: Callable[..., tf.data.Dataset]
    sample: Callable[[np.ndarray], Any]


@dataclass
class _Data:
    """The training data, decoded once: per-image inputs (pixels or trunk features) and labels
    (with any transformed classes), the triplet table, and the test and held-out sets."""

    folder: ImageFolder
    inputs: np.ndarray
    labels: np.ndarray
    triplets: pd.DataFrame
    test: tuple[ImageFolder, np.ndarray] | None
    heldout: tuple[ImageFolder, np.ndarray] | None


@dataclass
class _Batches:
    """The tf.data pipelines of one run and the optimizer steps per epoch."""

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    steps: int


def _plan(config: Config, embedding: keras.Model) -> _Plan:
    """The fast paths the config asks for: a cached frozen trunk (not with per-batch augmentation,
    which must see images) and distinct-image batches."""
    trunk, top = split_frozen_trunk(embedding) if config.train.caches_frozen_trunk else (None, embedding)

    def prepare(images: np.ndarray) -> np.ndarray:
        return images if trunk is None else predict_array(trunk, images, config.evaluate.embed_batch_size)

    if config.train.mining != "offline":
        model = OnlineTripletModel(top, config.train.mining, config.model.margin)
        return _Plan(model, prepare, pk_dataset, lambda x: x)
    if config.train.unique_batch_images:
        model = UniqueTripletModel(top, margin=config.model.margin)
        return _Plan(model, prepare, unique_triplet_dataset, lambda x: (x, np.zeros((1, 3), np.int64)))
    return _Plan(SiameseModel(top, margin=config.model.margin), prepare, triplet_dataset, lambda x: (x, x, x))


def _prepare_data(config: Config, plan: _Plan, train_dir, test_dir, heldout_dir,
                  triplets: pd.DataFrame | None) -> _Data:
    """Decode every image once, add transformed classes, run the frozen trunk (on the images and on their
    cached views), mine the triplet table."""
    size = config.model.input_size
    folder = scan_folder(train_dir)
    check_memory(config, plan.model.embedding, len(folder))  # before anything is decoded
    images, labels = decode_all(folder.paths, size), folder.labels
    augment = config.train.augment
    if augment.rotations_as_classes or augment.mirrors_as_classes:
        images, labels, _ = add_transformed_classes(images, labels, folder.class_names,
                                                    rotations=augment.rotations_as_classes,
                                                    mirrors=augment.mirrors_as_classes)
    inputs = plan.prepare(images)
    if augment.cached_views:  # one random view of every image at a time, each through the trunk once
        transforms = _transforms(config)
        views = [plan.prepare(random_views(images, transforms, config.evaluate.embed_batch_size))
                 for _ in range(augment.cached_views)]
        inputs, labels = np.concatenate([inputs, *views]), np.tile(labels, 1 + augment.cached_views)
    del images
    if triplets is None:
        if config.train.mining != "offline":
            triplets = pd.DataFrame(columns=TRIPLET_COLUMNS)
        else:  # mining embeds the already decoded (and trunk-cached) images
            mined = None if config.triplets.strategy == "random" else predict_array(
                plan.model.embedding, inputs, config.evaluate.embed_batch_size)
            triplets = mine_triplets(config, folder, embeddings=mined)
    test = heldout = None
    if test_dir is not None:
        test_folder = scan_folder(test_dir)
        test = (test_folder, plan.prepare(decode_all(test_folder.paths, size)))
    if heldout_dir is not None:
        heldout_folder = scan_folder(heldout_dir)
        heldout = (heldout_folder, decode_all(heldout_folder.paths, size))  # the few-shot callback embeds pixels
    return _Data(folder, inputs, labels, triplets, test, heldout)


def _offline_batches(config: Config, plan: _Plan, data: _Data) -> _Batches:
    """Triplet-table batches for training, and for validation when the test folder allows."""
    batch = config.train.batch_size
    train_index = _index_triplets(data.triplets, {p: i for i, p in enumerate(data.folder.paths)})
    train = plan.dataset(data.inputs, train_index, batch, shuffle_seed=config.train.seed, augment=_augmenter(config))
    steps = max(1, -(-len(train_index) // batch))
    if data.test is None:
        return _Batches(train, None, steps)
    test_folder, test_inputs = data.test
    try:
        val_table = generate_triplets(test_folder, "random", max_pairs_per_class=config.triplets.max_pairs_per_class,
                                      seed=config.train.seed)
    except DatasetError as exc:
        log.warning("no validation triplets: %s", exc)
        return _Batches(train, None, steps)
    val_index = _index_triplets(val_table, {p: i for i, p in enumerate(test_folder.paths)})
    return _Batches(train, plan.dataset(test_inputs, val_index, batch, shuffle_seed=None), steps)


def _online_batches(config: Config, data: _Data, done: int) -> _Batches:
    """P x K batches for the remaining epochs (drawn lazily, one epoch at a time), and validation batches."""
    p, k = config.train.classes_per_batch, config.train.images_per_class
    labels = data.labels
    steps = config.train.steps_per_epoch or max(1, -(-len(data.inputs) // (p * k)))
    pk_batches(labels, p, k, 0, seed=0)  # fail now, not inside tf.data, when no batch can be drawn
    train = pk_dataset(data.inputs, labels,
                       lambda: pk_epochs(labels, p, k, steps, config.train.seed, done, config.train.epochs),
                       steps * (config.train.epochs - done), augment=_augmenter(config))
    if data.test is None:
        return _Batches(train, None, steps)
    test_folder, test_inputs = data.test
    try:
        val_rows = pk_batches(test_folder.labels, p, k, max(1, -(-len(test_inputs) // (p * k))), seed=0)
    except DatasetError as exc:
        log.warning("no validation batches: %s", exc)
        return _Batches(train, None, steps)
    return _Batches(train, pk_dataset(test_inputs, test_folder.labels, lambda: iter(val_rows), len(val_rows)), steps)


def _transforms(config: Config):
    a = config.train.augment
    return augmentation_layers(a.rotation, a.shift, a.zoom, a.shear, a.flip, seed=config.train.seed)


def _augmenter(config: Config):
    """The transforms of every training batch, or None (off, or applied to cached views instead)."""
    return _transforms(config) if config.train.augment.per_batch else None


def activation_bytes(model: keras.Model) -> int:
    """Bytes of float32 outputs one image leaves in a forward pass through ``model``'s layers (nested models
    included): what a training step keeps per image for the backward pass, before gradients."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += activation_bytes(layer)
            continue
        for tensor in keras.tree.flatten(layer.output):
            total += 4 * int(np.prod([d for d in tensor.shape[1:] if d is not None]))
    return total


def check_memory(config: Config, model: keras.Model, images: int) -> None:
    """Refuse, in one line, a run whose decoded images and one training step would not fit in this machine's
    free memory: TensorFlow would otherwise end the process inside ``fit`` without a message. ``model`` is the
    part that trains (after a cached frozen trunk); a step counts twice its activations (the forward pass and
    their gradients)."""
    import psutil

    t, side = config.train, config.model.input_size
    online = t.mining != "offline"
    copies = (1 + 3 * t.augment.rotations_as_classes) * (1 + t.augment.mirrors_as_classes) if online else 1
    copies *= 1 + t.augment.cached_views
    step_images = t.classes_per_batch * t.images_per_class if online else 3 * t.batch_size
    needed = images * copies * side * side * 3 + 2 * step_images * activation_bytes(model)
    available = psutil.virtual_memory().available
    if needed > available:
        raise ConfigError(f"model.input_size {side} needs about {needed / 2**30:.1f} GiB for {images * copies} decoded "
                          f"images and a step of {step_images}, and this machine has {available / 2**30:.1f} GiB free; "
                          "lower model.input_size or the images per step")


def _fingerprint(config: Config, data: _Data) -> dict[str, object]:
    """What a resumed run must share with the run that wrote the checkpoint: every model, triplet and training
    setting but the number of epochs (a run may be extended), and the training and test files (paths,
    sizes, modification times)."""
    sections = {key: value for key, value in config.model_dump(mode="json").items() if key in ("model", "triplets", "train")}
    settings = {key: value for key, value in flatten(sections).items() if key != "train.epochs"}
    folders = {"data.train": data.folder, **({"data.test": data.test[0]} if data.test is not None else {})}
    return {**settings, **{key: folder_digest(folder) for key, folder in folders.items()}}


def _fit(config: Config, plan: _Plan, embedding: keras.Model, data: _Data, batches: _Batches, done: int,
         checkpoint_dir: Path | None, callbacks: list[keras.callbacks.Callback],
         verbose) -> tuple[dict, KeepBestWeights, int | None]:
    """Compile, restore a checkpoint when resuming, fit; returns (history, what kept the weights, collapse epoch)."""
    online = config.train.mining != "offline"
    model = plan.model
    keep_best = KeepBestWeights(embedding, None if online else "val_loss" if batches.validation is not None else "loss")
    model.compile(optimizer=make_optimizer(config.train, batches.steps))
    model(plan.sample(np.zeros((1, *data.inputs.shape[1:]), np.float32)))  # build before fitting or loading
    history: dict[str, list[float]] = {}
    if done and checkpoint_dir is not None:
        done, history = EpochCheckpoint.restore(checkpoint_dir, model, keep_best, _fingerprint(config, data))
        log.info("resuming from epoch %d of %d", done, config.train.epochs)
    # order matters: few-shot adds to the logs, keep_best updates before the checkpoint saves
    t = config.train
    images_per_step = t.classes_per_batch * t.images_per_class if online else 3 * t.batch_size
    own: list[keras.callbacks.Callback] = [
        PreciseBatchNorm(model.embedding, data.inputs, images_per_step, batches.steps, t.batchnorm_images, t.seed)]
    if data.heldout is not None:
        heldout_folder, heldout_images = data.heldout
        own.append(FewShotEvaluation(embedding, heldout_images, heldout_folder.labels, n_way=config.evaluate.fewshot_way))
    own.append(keep_best)
    if checkpoint_dir is not None and is_chief():  # every worker resumes from it; only the chief writes it
        own.append(EpochCheckpoint(checkpoint_dir, keep_best, history, _fingerprint(config, data)))
    guard = CollapseGuard(config.train.collapse_min_gap, config.train.collapse_patience, margin=config.model.margin)
    if online:
        own.append(guard)
    fitted = model.fit(batches.train, validation_data=batches.validation, epochs=config.train.epochs,
                       initial_epoch=done, steps_per_epoch=batches.steps, callbacks=[*own, *callbacks],
                       verbose=verbose, shuffle=False)  # the tf.data pipeline shuffles, seeded
    if checkpoint_dir is None or not is_chief():
        history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    return history, keep_best, guard.collapsed_at


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

    ``train.mining`` chooses the batches: ``offline`` trains on the triplet table, ``batch_all``,
    ``batch_hard`` or ``semihard`` sample P classes x K images per batch and mine inside it.
    Offline, the weights of the epoch with the lowest validation loss are kept; online, the last
    epoch's. After every epoch, batch normalisation's statistics are re-estimated on training images
    (``train.batchnorm_images``), so inference normalises as training did. ``train.augment`` transforms training
    batches on the fly, or adds ``cached_views`` random views of every image, made once. With
    ``train.cache_frozen_features`` the frozen backbone layers run once per image (and view); with
    ``train.unique_batch_images`` each distinct image of a triplet batch is embedded once.

    Args:
        config: the library config (model, triplets, train, evaluate).
        train_dir: the training folder, ``<dir>/<class>/<image>``.
        test_dir: a folder of the same shape for validation batches (when a class has two images).
        triplets: the training triplet table; by default generated with ``triplets.strategy``
            (offline) or left empty (online, where it is only a record).
        callbacks: more Keras callbacks, run after the project's own.
        verbose: Keras' progress output.
        checkpoint_dir: checkpoint every epoch here (its parent must be writable; checked first).
        resume: carry on from the checkpoint in ``checkpoint_dir`` (same config and data give
            the same batches).
        heldout_dir: classes never trained on; every epoch logs ``fewshot_<N>way_1shot``.

    Returns:
        A :class:`TrainResult`; its ``embedding`` is always the full network.
    """
    online = config.train.mining != "offline"
    augment = config.train.augment
    if (augment.rotations_as_classes or augment.mirrors_as_classes or augment.cached_views) and not online:
        raise ConfigError("train.augment.rotations_as_classes, mirrors_as_classes and cached_views need online "
                          "mining (train.mining)")
    strategy = strategy_for(config.train.distribute)
    distributed = config.train.distribute != "none"
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None and is_chief():
        ensure_writable(checkpoint.parent, "checkpoints")
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()

    with seeded(config.train.seed), strategy.scope():
        embedding = build_embedding_model(config.model, synchronized=distributed)
        plan = _plan(config, embedding)
        data = _prepare_data(config, plan, train_dir, test_dir, heldout_dir, triplets)
        done = EpochCheckpoint.saved_epochs(checkpoint) if resume and checkpoint is not None else 0
        batches = _online_batches(config, data, done) if online else _offline_batches(config, plan, data)
        history, kept, collapsed_at = _fit(config, plan, embedding, data, batches, done, checkpoint,
                                                 callbacks or [], verbose)
    warning = validation_warning(history)
    if warning:
        log.warning("%s", warning)
    if distributed:  # a plain single-device copy: the chief embeds its gallery and saves it alone
        trained, embedding = embedding, build_embedding_model(config.model)
        embedding.set_weights(trained.get_weights())
    return TrainResult(embedding, history, data.triplets, kept.best_epoch, data.folder, collapsed_at, kept.reason)
