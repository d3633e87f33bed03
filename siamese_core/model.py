"""The embedding network, the distance layer and the Siamese triplet model.

Every embedding model takes RGB images with values in [0, 255]; the first
layer applies the preprocessing its backbone was trained with, so callers
never scale images themselves.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers, ops

from .config import Config, ModelConfig
from .distance_ops import row_squared_distances
from .distribute import gather, replicas, step_logs
from .errors import BundleError, ConfigError, WeightsUnavailableError
from .mining import LOSSES, mean_pair_distances
from .pretrained import efficientnet_lite0, load_imagenet_weights
from .seeding import seeded

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
# First trainable layer when ``trainable_from`` is "auto": the seed's choice for ResNet50, the last
# inverted-residual blocks for MobileNetV3, the last 1x1 convolution for EfficientNet-Lite0 (on small photo
# sets, training more of it lost few-shot accuracy on new classes: docs/how-to/presets.md), everything for small_cnn.
AUTO_TRAINABLE_FROM = {"resnet50": "conv5_block1_out", "mobilenet_v3_small": "expanded_conv_9_expand",
                       "efficientnet_lite0": "top_conv", "small_cnn": None}
IMAGENET_WEIGHT_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
}


@keras.saving.register_keras_serializable(package="siamese_core")
class CaffePreprocess(layers.Layer):
    """ResNet50's ImageNet preprocessing: RGB [0, 255] -> BGR minus the channel means."""

    def call(self, inputs):
        bgr = ops.flip(ops.cast(inputs, "float32"), axis=-1)
        return bgr - ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype="float32")


@keras.saving.register_keras_serializable(package="siamese_core")
class DistanceLayer(layers.Layer):
    """Squared Euclidean distances (d(A, P), d(A, N)) between embedding batches."""

    def call(self, anchor, positive, negative):
        return row_squared_distances(anchor, positive), row_squared_distances(anchor, negative)


@keras.saving.register_keras_serializable(package="siamese_core")
class GeneralizedMeanPooling(layers.Layer):
    """Generalized-mean (GeM) pooling over positions: (mean of x^p)^(1/p), with p learned (Radenovic et al., 2018).

    p = 1 is average pooling; a large p approaches max pooling. Inputs are clipped at ``epsilon``.
    """

    def __init__(self, p: float = 3.0, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.initial_p, self.epsilon = p, epsilon

    def build(self, input_shape):
        self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.initial_p), name="p")

    def call(self, inputs):
        powered = ops.power(ops.maximum(inputs, self.epsilon), self.p)
        return ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.initial_p, "epsilon": self.epsilon}


def triplet_loss(ap_distance, an_distance, margin: float):
    """Per-triplet loss max(d(A,P) - d(A,N) + margin, 0) (Schroff et al., FaceNet, 2015)."""
    return ops.maximum(ap_distance - an_distance + margin, 0.0)


def _small_cnn(input_size: int, synchronized: bool = False, stem_stride: int = 1) -> keras.Model:
    """A four-block CNN (conv-BN-ReLU, max-pooling after the first three) for small or greyscale images
    on CPU; the first convolution moves ``stem_stride`` pixels at a time."""
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate((32, 64, 128, 256)):
        stride = stem_stride if i == 0 else 1
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"block{i + 1}_conv")(x)
        x = layers.BatchNormalization(synchronized=synchronized, name=f"block{i + 1}_bn")(x)
        x = layers.Activation("relu", name=f"block{i + 1}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x) if i < 3 else x
    return keras.Model(inputs, x, name="small_cnn")


def _load_weights_file(model: keras.Model, path: str) -> None:
    """Load a local weights file into ``model``, or a one-line WeightsUnavailableError naming it."""
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    try:
        model.load_weights(path)
    except Exception as exc:  # not an HDF5/.weights.h5 file, or weights of another architecture
        raise WeightsUnavailableError(f"{path}: not weights for this {model.name} ({type(exc).__name__}); use the "
                                      "file saved for the same backbone and input size, or weights=null") from None


def _keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def _pretrained(config: ModelConfig) -> keras.Model:
    """A pretrained-architecture backbone with ImageNet weights, a local weights file's, or none."""
    weights = config.weights
    if config.backbone == "efficientnet_lite0":  # its ImageNet weights install with a package: never downloaded
        model = efficientnet_lite0(config.input_size)
        if weights == "imagenet":
            load_imagenet_weights(model)
    else:
        if weights == "imagenet":
            cached = _keras_home() / "models" / IMAGENET_WEIGHT_FILES[config.backbone]
            if not cached.exists():
                weights = _download_imagenet_weights(config.backbone, cached)
        model = _keras_application(config.backbone, config.input_size, "imagenet" if weights == "imagenet" else None)
    if weights not in (None, "imagenet"):
        _load_weights_file(model, str(weights))
    return model


def _keras_application(backbone: str, input_size: int, weights: str | None) -> keras.Model:
    shape = (input_size, input_size, 3)
    if backbone == "resnet50":
        return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=shape)
    return keras.applications.MobileNetV3Small(include_top=False, weights=weights, input_shape=shape,
                                               include_preprocessing=True)


def _download_imagenet_weights(backbone: str, cached: Path) -> str:
    """Let Keras fetch the ImageNet file into its cache, or fail with a one-line error."""
    try:
        _keras_application(backbone, 32, "imagenet")
    except Exception as exc:  # the download failed: no network or a blocked host
        raise WeightsUnavailableError(
            f"{backbone} ImageNet weights are not in the Keras cache ({cached}) and could not be "
            f"downloaded ({type(exc).__name__}); use weights=<path to a local .h5/.weights.h5 file>, "
            "weights=null to train from scratch, or backbone=efficientnet_lite0, whose ImageNet weights "
            "install with this project (preset photos-cpu)"
        ) from None
    return "imagenet"


def _freeze_before(backbone: keras.Model, first_trainable: str | None) -> None:
    if first_trainable is None:
        backbone.trainable = True
        return
    names = [layer.name for layer in backbone.layers]
    if first_trainable not in names:
        raise ConfigError(f"trainable_from: no layer '{first_trainable}' in {backbone.name}")
    trainable = False
    for layer in backbone.layers:
        trainable = trainable or layer.name == first_trainable
        layer.trainable = trainable


def build_backbone(config: ModelConfig, synchronized: bool = False) -> keras.Model:
    """The convolutional trunk, with its preprocessing, frozen up to ``trainable_from``
    (``synchronized``: small_cnn's batch normalisation computes its statistics over all replicas)."""
    if config.backbone == "small_cnn":
        if config.weights == "imagenet":
            raise WeightsUnavailableError("small_cnn has no ImageNet weights; use weights=null or a local file")
        backbone = _small_cnn(config.input_size, synchronized, config.stem_stride)
        if config.weights is not None:
            _load_weights_file(backbone, config.weights)
    elif config.stem_stride != 1:
        raise ConfigError(f"stem_stride: only small_cnn has a stride to set, not {config.backbone}")
    else:
        backbone = _pretrained(config)
    first = AUTO_TRAINABLE_FROM[config.backbone] if config.trainable_from == "auto" else config.trainable_from
    _freeze_before(backbone, first)
    return backbone


def build_embedding_model(config: ModelConfig, synchronized: bool = False) -> keras.Model:
    """The embedding model f: image in [0, 255] -> ``embedding_dim`` vector.

    ``synchronized``: batch normalisation over all replicas of a distributed training (the
    same statistics as one device would compute on the whole batch).
    """
    backbone = build_backbone(config, synchronized)
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(inputs) if config.backbone == "resnet50" else inputs
    x = backbone(x)
    if config.pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    elif config.pooling == "gem":
        x = GeneralizedMeanPooling(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(config.head_units):
        x = layers.Dense(units, activation="relu", name=f"dense{i + 1}")(x)
        x = layers.BatchNormalization(synchronized=synchronized, name=f"bn{i + 1}")(x)
    x = layers.Dense(config.embedding_dim, name="embedding")(x)
    if config.l2_normalize:
        x = layers.UnitNormalization(name="l2_normalize")(x)
    return keras.Model(inputs, x, name="embedding")


def initial_embedding_model(config: Config) -> keras.Model:
    """The embedding model as training starts it: built under the training seed (``train.seed``)."""
    with seeded(config.train.seed):
        return build_embedding_model(config.model)


def _frozen_cut(backbone: keras.Model) -> list | None:
    """The backbone tensors where frozen layers feed trainable ones, or None if no weights are frozen.

    A layer is frozen when it has no trainable weights and all its inputs come from
    frozen layers; in inference mode such a layer is a fixed function of the image.
    """
    frozen: set[int] = set()
    cut: dict[int, object] = {}
    has_frozen_weights = False
    for operation in backbone.operations:  # in graph order, including non-layer ops such as ``x + 3``
        inputs = [] if isinstance(operation, layers.InputLayer) else keras.tree.flatten(operation.input)
        sources = [t._keras_history.operation for t in inputs]  # private: see tests/test_private_apis.py
        if not getattr(operation, "trainable_weights", []) and all(id(op) in frozen for op in sources):
            frozen.add(id(operation))
            has_frozen_weights = has_frozen_weights or bool(getattr(operation, "weights", []))
            continue
        for tensor, op in zip(inputs, sources):
            if id(op) in frozen:
                cut[id(tensor)] = tensor
    if not has_frozen_weights:
        return None
    return list(cut.values()) or list(backbone.outputs)


def split_frozen_trunk(embedding: keras.Model) -> tuple[keras.Model | None, keras.Model]:
    """Split an embedding model into a frozen trunk (image -> features) and a trainable top.

    Both parts share the embedding model's layer objects, so training the top trains
    ``embedding``. Returns ``(None, embedding)`` when no layer with weights is frozen
    or the frozen part does not end in a single tensor.
    """
    outer = [layer for layer in embedding.layers if not isinstance(layer, layers.InputLayer)]
    position = next((i for i, layer in enumerate(outer) if isinstance(layer, keras.Model)), None)
    cut = None if position is None else _frozen_cut(outer[position])
    if position is None or cut is None or len(cut) != 1:
        return None, embedding
    backbone, cut = outer[position], cut[0]
    x = embedding.inputs[0]
    for layer in outer[:position]:
        x = layer(x)
    trunk = keras.Model(embedding.inputs[0], keras.Model(backbone.inputs, cut, name="trunk_body")(x), name="frozen_trunk")
    features = keras.Input(tuple(cut.shape[1:]), name="features")
    y = keras.Model(cut, backbone.outputs[0], name="top_body")(features)
    for layer in outer[position + 1 :]:
        y = layer(y)
    return trunk, keras.Model(features, y, name="trainable_top")


class _BuiltBeforeFit(keras.Model):
    """A training model that training builds (one sample batch) before ``fit``.

    Under a distribution strategy Keras builds a model from its first batch averaged across
    replicas, which ``MultiWorkerMirroredStrategy`` cannot do; a model already built only
    needs its optimizer's variables, made here under the strategy.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # private: see tests/test_private_apis.py
        if not self.built or self.optimizer is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)


class SiameseModel(_BuiltBeforeFit):
    """Triplet network around an embedding model, with custom train and test steps.

    Each batch is ``(anchor, positive, negative)`` images; the three are embedded
    in one forward pass and the loss is the mean of max(d(A,P) - d(A,N) + margin, 0).
    """

    def __init__(self, embedding: keras.Model, margin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if margin <= 0:
            raise ConfigError(f"margin must be positive, got {margin}")
        self.embedding = embedding
        self.margin = margin
        self.distance = DistanceLayer(name="distance")
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, inputs, training=False):
        anchor, positive, negative = inputs
        batch = ops.shape(anchor)[0]
        embedded = self.embedding(ops.concatenate([anchor, positive, negative], axis=0), training=training)
        return self.distance(embedded[:batch], embedded[batch : 2 * batch], embedded[2 * batch :])

    def _loss(self, data, training: bool):
        ap_distance, an_distance = self(data, training=training)
        return ops.mean(triplet_loss(ap_distance, an_distance, self.margin))

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = self._loss(data, training=True)
            scaled = loss / replicas()  # the replicas' gradients are summed: their mean is the batch's
        variables = self.embedding.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        self.loss_tracker.update_state(loss)
        return step_logs({"loss": self.loss_tracker.result()})

    def test_step(self, data):
        self.loss_tracker.update_state(self._loss(data, training=False))
        return step_logs({"loss": self.loss_tracker.result()})

    @property
    def metrics(self):
        return [self.loss_tracker]


class UniqueTripletModel(SiameseModel):
    """A triplet model fed each distinct image once: ``(inputs, index)`` batches.

    ``inputs`` holds the batch's distinct images (or trunk features) and ``index``
    ``(b, 3)`` gives each triplet's anchor, positive and negative rows in it, so an
    image used by several triplets of a batch is embedded once.
    """

    def call(self, inputs, training=False):
        unique, index = inputs
        embedded = self.embedding(unique, training=training)
        anchor, positive, negative = (ops.take(embedded, index[:, i], axis=0) for i in range(3))
        return self.distance(anchor, positive, negative)


class OnlineTripletModel(_BuiltBeforeFit):
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
        embeddings, labels = gather(self(images, training=training), labels)  # mine over the global batch
        loss = LOSSES[self.strategy](labels, embeddings, self.margin)
        positive, negative = mean_pair_distances(labels, embeddings)
        return loss, positive, negative

    def _track(self, loss, positive, negative):
        self.loss_tracker.update_state(loss)
        self.positive_tracker.update_state(positive)
        self.negative_tracker.update_state(negative)
        return step_logs({m.name: m.result() for m in self.metrics})

    def train_step(self, data):
        images, labels = data
        with tf.GradientTape() as tape:
            loss, positive, negative = self._step(images, labels, training=True)
            scaled = loss / replicas()  # every replica holds the global loss; the gradients are summed
        variables = self.embedding.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._track(loss, positive, negative)

    def test_step(self, data):
        return self._track(*self._step(*data, training=False))

    @property
    def metrics(self):
        return [self.loss_tracker, self.positive_tracker, self.negative_tracker]


def load_embedding(path: str | os.PathLike) -> keras.Model:
    """Load a saved embedding network (a ``model.keras``): safe mode, uncompiled, the project's layers registered.

    A missing file, or one that is not a Keras archive, is a BundleError naming it."""
    if not Path(path).is_file():
        raise BundleError(f"{path}: the saved network is missing")
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path}: not a saved Keras network (a .keras zip archive); it is damaged or was "
                          "replaced; train again")
    return keras.saving.load_model(path, compile=False, safe_mode=True)
