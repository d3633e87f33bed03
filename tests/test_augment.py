"""Augmentation keeps shapes, value ranges and labels."""

import numpy as np

from siamese_core.augment import add_transformed_classes, augmentation_layers


def test_random_affine_keeps_shape_and_range_and_changes_pixels():
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    augment = augmentation_layers(rotation=15, shift=0.1, zoom=0.1, shear=0.1, flip="horizontal", seed=1)
    out = np.asarray(augment(images, training=True))
    assert out.shape == images.shape
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    assert not np.allclose(out, images)
    np.testing.assert_allclose(np.asarray(augment(images, training=False)), images)  # off at inference


def test_no_options_means_no_layer():
    assert augmentation_layers() is None


def test_rotations_become_new_classes():
    images = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    out, labels, names = add_transformed_classes(images, np.array([0, 1]), ["a", "b"])
    assert out.shape == (8, 3, 3, 1)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert names == ["a", "b", "a@rot90", "b@rot90", "a@rot180", "b@rot180", "a@rot270", "b@rot270"]
    np.testing.assert_array_equal(out[2], np.rot90(images[0]))
    np.testing.assert_array_equal(out[6], np.rot90(images[0], 3))


def test_mirrors_become_new_classes_with_or_without_rotations():
    images = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    out, labels, names = add_transformed_classes(images, np.array([0, 1]), ["a", "b"], rotations=False, mirrors=True)
    assert out.shape == (4, 3, 3, 1) and labels.tolist() == [0, 1, 2, 3]
    assert names == ["a", "b", "a@mirror", "b@mirror"]
    np.testing.assert_array_equal(out[2], images[0][:, ::-1])
    out, labels, names = add_transformed_classes(images, np.array([1, 0]), ["a", "b"], mirrors=True)
    assert out.shape == (16, 3, 3, 1) and labels.tolist()[-2:] == [15, 14]
    assert names[-1] == "b@mirror@rot270"
    np.testing.assert_array_equal(out[15], np.rot90(images[1][:, ::-1], 3))
