"""What happens at enrolment and query time: test-time views, class means, and few-shot episodes scored
through the recogniser's own enrol-and-search path."""

import numpy as np
import pytest

from siamese_core.augment import RandomAffine
from siamese_core.config import apply_overrides
from siamese_core.embed import embed_images, shifted_views
from siamese_core.errors import ConfigError
from siamese_core.evaluation import assess
from siamese_core.gallery import Gallery
from siamese_core.metrics import few_shot_accuracy
from siamese_core.model import build_embedding_model
from siamese_core.recognizer import SiameseRecognizer

from support.models import untrained_recognizer
from support.tiny import tiny_config


def test_views_are_the_image_then_shifted_copies_with_edges_repeated():
    images = np.arange(2 * 20 * 20 * 3, dtype=np.uint8).reshape(2, 20, 20, 3)
    views = shifted_views(images, 9, shift=0.1)
    assert len(views) == 9 and all(v.shape == images.shape for v in views)
    np.testing.assert_array_equal(views[0], images)
    # view 1 moves the content 2 px right and down: output pixel (y, x) shows input (y - 2, x - 2), edges repeated
    np.testing.assert_array_equal(views[1][:, 2:, 2:], images[:, :-2, :-2])
    np.testing.assert_array_equal(views[1][:, 0, 0], images[:, 0, 0])
    np.testing.assert_array_equal(views[8][:, :, :-2], images[:, :, 2:])  # the last: 2 px left
    assert len({v.tobytes() for v in views}) == 9


def test_test_time_embeddings_are_the_unit_mean_of_the_views():
    network = build_embedding_model(tiny_config(l2_normalize=True).model)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    by_view = [embed_images(network, list(v), 8) for v in shifted_views(images, 5)]
    mean = np.mean(by_view, axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    averaged = embed_images(network, list(images), 8, views=5)
    np.testing.assert_allclose(averaged, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(averaged, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(averaged, by_view[0], atol=1e-4)


def test_class_means_decide_where_the_nearest_image_would_not():
    # class a: one image right on the query, one far away; class b: two images near it on either side
    rows = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, -1.0]], np.float32)
    gallery = Gallery(rows, [0, 0, 1, 1], ["a", "b"], ["a0", "a1", "b0", "b1"])
    query = np.array([[0.0, 0.1]], np.float32)
    assert gallery.search(query, 1)[0].label == "a"
    gallery.class_means = True
    np.testing.assert_allclose(gallery.means(), [[5.0, 0.0], [0.0, 0.0]])
    match = gallery.search(query, 2)[0]
    assert match.label == "b" and match.distance == pytest.approx(0.01)
    assert match.top_k[1][0] == "a" and match.nearest_path == "b0"  # the nearest image of the chosen class
    assert gallery.extend(rows[:1], ["c"], ["c0"]).class_means


def test_class_means_of_unit_rows_are_back_to_unit_length():
    rows = np.random.default_rng(1).normal(size=(12, 4)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    gallery = Gallery(rows, np.repeat([0, 1, 2], 4), ["a", "b", "c"], [str(i) for i in range(12)], class_means=True)
    means = rows.reshape(3, 4, 4).mean(axis=1)
    np.testing.assert_allclose(gallery.means(), means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-6)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return untrained_recognizer(tmp_path_factory.mktemp("untrained"), fewshot_episodes=20, l2_normalize=True)


def by_prototype(support, support_labels, queries):
    """Written out: the class of the nearest unit-length class mean."""
    classes = np.unique(support_labels)
    means = np.stack([support[support_labels == c].mean(axis=0) for c in classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return classes[((queries[:, None] - means[None]) ** 2).sum(-1).argmin(axis=1)]


def by_nearest_image(support, support_labels, queries):
    return support_labels[((queries[:, None] - support[None]) ** 2).sum(-1).argmin(axis=1)]


def with_evaluate(recognizer, **settings):
    config = apply_overrides(recognizer.config, {f"evaluate.{k}": v for k, v in settings.items()})
    g = recognizer.gallery
    return SiameseRecognizer(recognizer.embedding, Gallery(g.embeddings, g.labels, g.class_names, g.paths), config)


def test_an_episode_is_answered_by_the_recognizers_own_search(untrained):
    rng = np.random.default_rng(2)
    support = rng.normal(size=(60, 6)).astype(np.float32)
    support /= np.linalg.norm(support, axis=1, keepdims=True)
    labels, queries = np.repeat(np.arange(20) * 3 + 1, 3), rng.normal(size=(40, 6)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    by_mean = with_evaluate(untrained[0], match="class_mean").classify_among(support, labels, queries)
    by_image = with_evaluate(untrained[0]).classify_among(support, labels, queries)
    np.testing.assert_array_equal(by_mean, by_prototype(support, labels, queries))
    np.testing.assert_array_equal(by_image, by_nearest_image(support, labels, queries))
    assert np.any(by_mean != by_image)  # the two rules differ here, so each comparison above means something


def test_few_shot_episodes_enrol_and_search_as_the_recognizer_does(untrained):
    recognizer, train, test, heldout = untrained
    product = with_evaluate(recognizer, match="class_mean", test_time_views=5, fewshot_shots=[3], baselines=False)
    assert product.gallery.class_means
    calls = []
    search = product.classify_among
    product.classify_among = lambda *args: calls.append(len(args[0])) or search(*args)
    report = assess(product, test, heldout=heldout).report.fewshot["3shot"]
    assert calls == [2 * 3] * product.config.evaluate.fewshot_episodes  # every episode: 2 classes x 3 enrolled
    embedded = embed_images(recognizer.embedding, heldout.paths, 8, views=5)
    expected = few_shot_accuracy(embedded, heldout.labels, report.n_way, 3, product.config.evaluate.fewshot_episodes,
                                 classify=by_prototype)
    assert (report.mean, report.ci95) == pytest.approx((expected["mean"], expected["ci95"]))


def test_one_affine_transform_is_seeded_and_off_at_inference():
    images = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype(np.float32)
    first, second = RandomAffine(10, 0.1, 0.1, 0.1, seed=3), RandomAffine(10, 0.1, 0.1, 0.1, seed=3)
    out = np.asarray(first(images, training=True))
    np.testing.assert_array_equal(out, np.asarray(second(images, training=True)))
    assert not np.allclose(out, np.asarray(first(images, training=True)))  # the next batch draws anew
    np.testing.assert_array_equal(np.asarray(first(images, training=False)), images)
    restored = RandomAffine.from_config(first.get_config())
    assert (restored.rotation, restored.shift, restored.zoom, restored.shear) == (10, 0.1, 0.1, 0.1)


def test_a_pure_shift_moves_the_content_by_that_fraction():
    images = np.zeros((1, 20, 20, 1), np.float32)
    images[0, 8:12, 8:12] = 255
    shifted = np.asarray(RandomAffine(shift=0.1, seed=0)(images, training=True))[0, ..., 0]
    ys, xs = np.nonzero(shifted > 127)
    moved = (ys.mean() - 9.5, xs.mean() - 9.5)
    assert max(abs(m) for m in moved) <= 2.0 + 1e-6 and shifted.sum() == pytest.approx(images.sum(), rel=0.3)


def test_a_strided_stem_reads_twice_the_side_for_the_same_feature_map():
    wide = build_embedding_model(tiny_config(input_size=64, stem_stride=2).model)
    narrow = build_embedding_model(tiny_config(input_size=32).model)
    assert wide.get_layer("small_cnn").output.shape == narrow.get_layer("small_cnn").output.shape
    assert wide.count_params() == narrow.count_params()
    with pytest.raises(ConfigError, match="stem_stride"):
        build_embedding_model(apply_overrides(tiny_config(), {"backbone": "resnet50", "weights": None,
                                                              "stem_stride": 2}).model)


def test_a_bundle_with_test_time_views_finds_its_own_gallery_image_at_distance_zero(untrained, tmp_path):
    recognizer, train, test, heldout = untrained
    product = with_evaluate(recognizer, test_time_views=5).with_gallery(train)
    np.testing.assert_allclose(product.gallery.embeddings, embed_images(recognizer.embedding, train.paths, 8, views=5),
                               atol=1e-6)
    product.save(tmp_path / "bundle")
    loaded = SiameseRecognizer.load(tmp_path / "bundle")
    assert loaded.config.evaluate.test_time_views == 5
    for path, label in list(zip(train.paths, train.label_names))[::5]:
        match = loaded.predict_one(path)
        assert match.label == label and match.distance == pytest.approx(0.0, abs=1e-6) and match.nearest_path == path


def test_search_settings_are_fixed_and_with_settings_applies_every_one(untrained):
    """Swapping in match=class_mean used to change the config but not the gallery's search (a stale
    class_means flag): top-1 searched one way and few-shot the other. Settings are now given when a
    recogniser is made, and a recogniser searching another way is another recogniser."""
    recognizer, train, test, heldout = untrained
    assert not recognizer.gallery.class_means
    with pytest.raises(AttributeError):
        recognizer.config = apply_overrides(recognizer.config, {"evaluate.match": "class_mean"})
    by_mean = recognizer.with_settings(match="class_mean", top_k=2)
    assert by_mean.gallery.class_means and not recognizer.gallery.class_means  # the original is untouched
    assert (by_mean.config.evaluate.match, by_mean.config.evaluate.top_k) == ("class_mean", 2)
    built = with_evaluate(recognizer, match="class_mean", top_k=2)  # made with class_mean from the start
    assert [m.label for m in by_mean.predict(test.paths)] == [m.label for m in built.predict(test.paths)]
    assert assess(by_mean, test).report.top1 == assess(built, test).report.top1
    with pytest.raises(ConfigError, match="match"):
        recognizer.with_settings(match="nearest-ish")
