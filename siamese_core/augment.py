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


def add_transformed_classes(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], rotations: bool = True, mirrors: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each class's 90/180/270-degree rotations and/or its mirror image as extra classes (in memory).

    Returns the originals followed by each transform of every image, with labels
    ``t * n_classes + label`` for transform ``t``, and names such as ``"cat@rot90"``,
    ``"cat@mirror"`` or ``"cat@mirror@rot270"``.
    """
    transforms = [(False, k) for k in range(4 if rotations else 1)]
    transforms += [(True, k) for k in range(4 if rotations else 1)] if mirrors else []
    out, names, count = [], [], len(class_names)
    for mirrored, quarter_turns in transforms:
        source = images[:, :, ::-1] if mirrored else images
        out.append(np.rot90(source, quarter_turns, axes=(1, 2)))
        suffix = ("@mirror" if mirrored else "") + (f"@rot{90 * quarter_turns}" if quarter_turns else "")
        names += [name + suffix for name in class_names]
    return np.concatenate(out), np.concatenate([labels + t * count for t in range(len(transforms))]), names
