"""On-the-fly augmentation for training batches; nothing is written to disk."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def augmentation_layers(
    rotation: float = 0.0, shift: float = 0.0, zoom: float = 0.0, shear: float = 0.0,
    flip: str = "none", seed: int = 0,
) -> keras.Sequential | None:
    """Random affine transforms and flips as a Keras pipeline, or None when all are off.

    ``rotation`` is in degrees; ``shift``, ``zoom`` and ``shear`` are fractions of the
    image side; ``flip`` is none, horizontal, vertical or both. Empty space is
    filled with the nearest edge pixels.
    """
    steps = []
    if flip != "none":
        steps.append(layers.RandomFlip("horizontal_and_vertical" if flip == "both" else flip, seed=seed))
    if rotation:
        steps.append(layers.RandomRotation(rotation / 360.0, fill_mode="nearest", seed=seed + 1))
    if shift:
        steps.append(layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed + 2))
    if zoom:
        steps.append(layers.RandomZoom(zoom, zoom, fill_mode="nearest", seed=seed + 3))
    if shear:
        steps.append(layers.RandomShear(shear, shear, fill_mode="nearest", seed=seed + 4))
    return keras.Sequential(steps, name="augment") if steps else None


def add_rotated_classes(
    images: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each class's 90/180/270-degree rotations as three extra classes (in memory).

    Returns four times the images, with labels ``k * n_classes + label`` for the
    rotation by ``k`` quarter turns, and names such as ``"cat@rot90"``.
    """
    rotated = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    count = len(class_names)
    names = [name if k == 0 else f"{name}@rot{90 * k}" for k in range(4) for name in class_names]
    return np.concatenate(rotated), np.concatenate([labels + k * count for k in range(4)]), names
