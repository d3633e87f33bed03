"""The fast paths give the same answers: cached frozen trunk, distinct-image batches, padded embedding, faiss index."""

import numpy as np
import pytest

import siamese_core.train as training
from siamese_core.batches import pk_dataset
from siamese_core.config import Config, ModelConfig, apply_overrides
from siamese_core.data import scan_folder
from siamese_core.embed import embed_images
from siamese_core.errors import ConfigError
from siamese_core.gallery import Gallery
from siamese_core.model import (
    SiameseModel,
    UniqueTripletModel,
    build_embedding_model,
    initial_embedding_model,
    split_frozen_trunk,
)
from siamese_core.train import train

from support.images import make_digits_dataset
from support.tiny import TINY_NETWORK

# small_cnn with its first two blocks frozen: a trunk with weights, and a trainable top
FROZEN = dict(TINY_NETWORK, trainable_from="block3_conv")
VIEWS = {"train.augment.rotation": 10, "train.augment.zoom": 0.2, "train.augment.flip": "horizontal"}


def _images(n, seed=0, size=32):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("digits"), classes=4, train_per_class=5, test_per_class=3)


def test_trunk_and_top_share_the_embedding_layers_and_compose_to_it():
    embedding = build_embedding_model(ModelConfig(**FROZEN))
    trunk, top = split_frozen_trunk(embedding)
    assert trunk.output_shape == (None, 8, 8, 64) and not trunk.trainable_weights
    assert {id(v) for v in top.trainable_weights} == {id(v) for v in embedding.trainable_weights}
    images = _images(3)
    np.testing.assert_allclose(top.predict(trunk.predict(images, verbose=0), verbose=0),
                               embedding.predict(images, verbose=0), atol=1e-5)
    assert split_frozen_trunk(build_embedding_model(ModelConfig(**{**FROZEN, "trainable_from": None})))[0] is None


def test_distinct_image_batches_give_the_three_way_loss():
    embedding = build_embedding_model(ModelConfig(**FROZEN))
    three_way, unique = SiameseModel(embedding), UniqueTripletModel(embedding)
    images = _images(5)
    index = np.array([[0, 1, 2], [0, 3, 4], [1, 0, 4]])  # images 0, 1 and 4 are used twice
    a, p, n = (images[index[:, i]] for i in range(3))
    expected = np.asarray(three_way._loss((a, p, n), training=False))
    assert float(unique._loss((images, index), training=False)) == pytest.approx(float(expected), rel=1e-5)
    # with no image repeated, even training mode (batch statistics) gives the same loss
    distinct = np.arange(9)[::-1].reshape(3, 3)
    images9 = _images(9, seed=1)
    a, p, n = (images9[distinct[:, i]] for i in range(3))
    assert float(unique._loss((images9, distinct), training=True)) == pytest.approx(
        float(three_way._loss((a, p, n), training=True)), rel=1e-4)


def test_cached_trunk_training_matches_uncached_training(digits):
    base = dict(FROZEN, learning_rate=3e-3, epochs=3, batch_size=8, seed=3, unique_batch_images=False)
    results = {}
    for cached in (False, True):
        config = apply_overrides(Config(), {**base, "cache_frozen_features": cached})
        results[cached] = train(config, *digits, verbose=0)
    slow, fast = results[False], results[True]
    assert fast.triplets.equals(slow.triplets)
    np.testing.assert_allclose(fast.history["loss"], slow.history["loss"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(fast.history["val_loss"], slow.history["val_loss"], rtol=1e-3, atol=1e-5)
    assert fast.history["loss"][-1] < fast.history["loss"][0]
    assert fast.embedding.input_shape == (None, 32, 32, 3)  # the full image -> embedding model
    images = _images(4)
    np.testing.assert_allclose(fast.embedding.predict(images, verbose=0), slow.embedding.predict(images, verbose=0),
                               rtol=1e-3, atol=1e-3)


def test_all_fast_paths_together_still_learn(digits):
    config = apply_overrides(Config(), dict(FROZEN, learning_rate=3e-3, epochs=3, batch_size=8, seed=3))
    result = train(config, *digits, verbose=0)
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_one_image_embeds_as_it_does_in_a_full_batch():
    embedding = build_embedding_model(ModelConfig(**FROZEN))
    images = _images(5).astype(np.uint8)
    batch = embed_images(embedding, list(images), batch_size=4)
    single = embed_images(embedding, [images[4]], batch_size=4)
    np.testing.assert_allclose(single[0], batch[4], atol=1e-5)


def _clustered_gallery(classes=40, per_class=50, dim=16, **options):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), per_class)
    embeddings = centres[labels] + rng.normal(size=(len(labels), dim))
    names = [f"c{i}" for i in range(classes)]
    return Gallery(embeddings, labels, names, [f"p{i}" for i in range(len(labels))], **options), embeddings


def test_index_search_agrees_with_exact_search():
    exact, embeddings = _clustered_gallery()
    approx, _ = _clustered_gallery(index_threshold=100, nprobe=8)
    assert approx.uses_index and not exact.uses_index
    queries = embeddings[::7] + np.random.default_rng(1).normal(scale=0.3, size=embeddings[::7].shape)
    want, got = exact.search(queries, top_k=3), approx.search(queries, top_k=3)
    assert [m.label for m in got] == [m.label for m in want]
    assert [m.nearest_path for m in got] == [m.nearest_path for m in want]
    np.testing.assert_allclose([m.distance for m in got], [m.distance for m in want], rtol=1e-3, atol=1e-3)


def test_index_search_widens_when_the_nearest_rows_hold_too_few_classes():
    exact, embeddings = _clustered_gallery(classes=3, per_class=400)
    approx, _ = _clustered_gallery(classes=3, per_class=400, index_threshold=100, nprobe=2)
    queries = embeddings[:5]
    want, got = exact.search(queries, top_k=3), approx.search(queries, top_k=3)
    assert [[c for c, _ in m.top_k] for m in got] == [[c for c, _ in m.top_k] for m in want]
    np.testing.assert_allclose([m.distance for m in got], [m.distance for m in want], atol=1e-4)


def test_hard_mining_inside_training_uses_the_cached_trunk_and_mines_the_same_triplets(digits):
    from siamese_core.train import mine_triplets

    config = apply_overrides(Config(), dict(FROZEN, epochs=1, batch_size=8, seed=3, strategy="hard"))
    result = train(config, digits[0], verbose=0)
    standalone = mine_triplets(config, scan_folder(digits[0]), initial_embedding_model(config))
    assert result.triplets.equals(standalone)




def test_cached_views_go_through_the_trunk_once_each_and_train_the_top_as_more_images(digits, monkeypatch):
    trunk_rows, trained = [], []
    predict = training.predict_array

    def trunk_counted(model, rows, *args, **kwargs):
        if model.name == "frozen_trunk":
            trunk_rows.append(rows.copy())
        return predict(model, rows, *args, **kwargs)

    def dataset_recorded(inputs, labels, *args, **kwargs):
        trained.append((inputs, labels))
        return pk_dataset(inputs, labels, *args, **kwargs)

    monkeypatch.setattr(training, "predict_array", trunk_counted)
    monkeypatch.setattr(training, "pk_dataset", dataset_recorded)
    views = 3
    config = apply_overrides(Config(), {**FROZEN, **VIEWS, "train.augment.cached_views": views, "mining": "batch_all",
                                        "classes_per_batch": 4, "images_per_class": 4, "learning_rate": 3e-3,
                                        "epochs": 3, "seed": 3})
    result = train(config, *digits, verbose=0)
    train_folder, test_folder = scan_folder(digits[0]), scan_folder(digits[1])
    n = len(train_folder)
    # the originals, each view, the test images: the trunk runs once per view, not per batch
    assert [len(rows) for rows in trunk_rows] == [n] * (1 + views) + [len(test_folder)]
    assert not np.array_equal(trunk_rows[1], trunk_rows[0]) and not np.array_equal(trunk_rows[2], trunk_rows[1])
    inputs, labels = trained[0]
    assert inputs.shape == ((1 + views) * n, 8, 8, 64)  # trunk features, not pixels
    np.testing.assert_array_equal(labels, np.tile(train_folder.labels, 1 + views))
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_cached_views_need_a_transform_and_online_mining(digits):
    with pytest.raises(ConfigError, match="cached_views needs a transform"):
        apply_overrides(Config(), {**FROZEN, "train.augment.cached_views": 2})
    config = apply_overrides(Config(), {**FROZEN, **VIEWS, "train.augment.cached_views": 2, "mining": "offline"})
    with pytest.raises(ConfigError, match="need online mining"):
        train(config, *digits, verbose=0)
