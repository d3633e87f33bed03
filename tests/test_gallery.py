"""Gallery search: squared distances, nearest class, top-k, enrolment."""

import numpy as np
import pytest

from siamese_core.distance import squared_distances
from siamese_core.gallery import Gallery


def test_squared_distances_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(5, 7)), rng.normal(size=(9, 7))
    brute = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(q, r), brute, rtol=1e-4, atol=1e-4)


def _gallery():
    embeddings = np.array([[0, 0], [0, 1], [5, 5], [10, 0]], dtype=np.float32)
    # labels deliberately out of order: the gallery regroups rows by class
    return Gallery(embeddings, [2, 0, 1, 2], ["a", "b", "c"], ["p0", "p1", "p2", "p3"])


def test_nearest_class_and_distance():
    match = _gallery().search(np.array([[0.0, 0.9]]), top_k=3)[0]
    assert match.label == "a" and abs(match.distance - 0.01) < 1e-5
    assert [label for label, _ in match.top_k] == ["a", "c", "b"]
    assert match.nearest_path == "p1"
    distances = [d for _, d in match.top_k]
    assert distances == sorted(distances)


def test_top_k_lists_distinct_classes_capped_by_class_count():
    match = _gallery().search(np.array([[9.0, 0.0]]), top_k=10)[0]
    assert [label for label, _ in match.top_k] == ["c", "b", "a"]  # 1, 41, 82


def test_extend_adds_a_class_and_round_trips(tmp_path):
    gallery = _gallery().extend(np.array([[100.0, 100.0]]), ["new class"], ["p4"])
    assert gallery.search(np.array([[99.0, 99.0]]))[0].label == "new class"
    gallery.save(tmp_path / "g.npz")
    loaded = Gallery.load(tmp_path / "g.npz")
    assert loaded.class_names == gallery.class_names and loaded.paths == gallery.paths
    np.testing.assert_array_equal(loaded.embeddings, gallery.embeddings)


@pytest.mark.parametrize("labels", [[0, 1, 5], [0, 0, 2], [1, 2, 3], [-1, 0, 1]])
def test_labels_that_do_not_index_every_class_name_are_refused(labels):
    with pytest.raises(ValueError, match="must index its 3 class names"):
        Gallery(np.zeros((3, 2)), labels, ["a", "b", "c"], ["p", "q", "r"])
