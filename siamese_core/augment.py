"""Augmentation of training images, on the fly or as views made once; nothing is written to disk."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


@keras.saving.register_keras_serializable(package="siamese_core")
class RandomAffine(layers.RandomRotation):
    """Random rotation, shift, zoom and shear of every image, composed into one transform.

    One resampling pass per batch, where a chain of Keras' separate random layers resamples
    once per transform (four times the work, and four interpolations of the same pixels).
    ``rotation`` is in degrees; ``shift``, ``zoom`` and ``shear`` are fractions: of the side,
    of the scale (each axis drawn on its own) and of the shear slope. Empty space takes the
    nearest edge pixel.
    """

    def __init__(self, rotation: float = 0.0, shift: float = 0.0, zoom: float = 0.0, shear: float = 0.0,
                 seed: int | None = None, **kwargs):
        kwargs.pop("factor", None)
        kwargs.setdefault("fill_mode", "nearest")
        super().__init__(factor=0.0, seed=seed, **kwargs)
        self.rotation, self.shift, self.zoom, self.shear = rotation, shift, zoom, shear

    def get_random_transformation(self, data, training=True, seed=None):
        if not training:
            return None
        ops = self.backend
        shape = ops.core.shape(data)
        batch, height, width = shape[0], ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
        seed = self._get_seed_generator(ops._backend) if seed is None else seed

        def draw(half_width):
            return ops.random.uniform((batch,), minval=-half_width, maxval=half_width, seed=seed)

        angle = draw(self.rotation * np.pi / 180.0)
        slope, zoom_x, zoom_y = draw(self.shear), 1.0 + draw(self.zoom), 1.0 + draw(self.zoom)
        cos, sin = ops.numpy.cos(angle), ops.numpy.sin(angle)
        # input point = centre + diag(zoom) @ [[1, slope], [0, 1]] @ rotation @ (output point - centre) + shift
        a0, a1 = zoom_x * (cos + slope * sin), zoom_x * (-sin + slope * cos)
        b0, b1 = zoom_y * sin, zoom_y * cos
        cx, cy = (width - 1) / 2, (height - 1) / 2
        a2 = draw(self.shift) * width + cx - a0 * cx - a1 * cy
        b2 = draw(self.shift) * height + cy - b0 * cx - b1 * cy
        matrix = ops.numpy.stack([a0, a1, a2, b0, b1, b2, ops.numpy.zeros_like(a0), ops.numpy.zeros_like(a0)], axis=1)
        return {"rotation_matrix": matrix}

    def get_config(self):
        config = super().get_config()
        config.pop("factor", None)
        return {**config, "rotation": self.rotation, "shift": self.shift, "zoom": self.zoom, "shear": self.shear}


def augmentation_layers(
    rotation: float = 0.0, shift: float = 0.0, zoom: float = 0.0, shear: float = 0.0,
    flip: str = "none", seed: int = 0,
) -> keras.Sequential | None:
    """Random flips and one :class:`RandomAffine` transform as a Keras pipeline, or None when all are off.

    ``rotation`` is in degrees; ``shift``, ``zoom`` and ``shear`` are fractions of the
    image side; ``flip`` is none, horizontal, vertical or both.
    """
    steps: list[layers.Layer] = []
    if flip != "none":
        steps.append(layers.RandomFlip("horizontal_and_vertical" if flip == "both" else flip, seed=seed))
    if rotation or shift or zoom or shear:
        steps.append(RandomAffine(rotation, shift, zoom, shear, seed=seed + 1))
    return keras.Sequential(steps, name="augment") if steps else None


def random_views(images: np.ndarray, transforms: keras.Sequential, batch_size: int = 64) -> np.ndarray:
    """One random view of every uint8 image through ``transforms``, ``batch_size`` images at a time."""
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        view = transforms(images[start : start + batch_size].astype(np.float32), training=True)
        out[start : start + batch_size] = np.clip(np.round(keras.ops.convert_to_numpy(view)), 0, 255)
    return out


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
