"""The embedded demo dataset: a slice of Omniglot written out as class folders of PNG images.

``demo/omniglot-slice.npz`` (made by ``benchmarks/make_demo_slice.py``; MIT licence in
``demo/LICENSE``) holds 20 drawings, 32x32 greyscale, of each of 60 handwritten characters:
40 "known" classes from four alphabets, and 20 "held-out" classes, the Latin letters a-t,
that training never sees. :func:`write_demo_data` writes them as::

    root/train/<class>/<nn>.png     the first 14 drawings of each known class
    root/test/<class>/<nn>.png      the other 6: closed-set test queries
    root/heldout/<class>/<nn>.png   all 20 drawings of each held-out class: few-shot episodes

``<class>`` is the Omniglot name (``Korean__character03``) and ``<nn>`` the drawing's index in its class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from siamese_core.errors import ConfigError, DatasetError
from siamese_core.io import atomic_dir

SLICE = Path(__file__).resolve().parent / "demo" / "omniglot-slice.npz"
TRAIN_PER_CLASS = 14  # of a known class's 20 drawings; the rest are its test split


def load_slice(path: str | os.PathLike = SLICE) -> dict[str, np.ndarray]:
    """The arrays of the slice: ``images`` (classes, 20, 32, 32) uint8, ``classes``,
    ``alphabets`` (one name per class) and ``heldout`` (one bool per class)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def split_sizes(per_class: int | None, total: int) -> tuple[int, int]:
    """Train and test drawings of a known class when its first ``per_class`` of ``total`` are kept.

    The full class splits 14 / 6; fewer drawings split in about the same ratio, with at
    least 2 train drawings and 1 test drawing.
    """
    if per_class is None or per_class >= total:
        return TRAIN_PER_CLASS, total - TRAIN_PER_CLASS
    if per_class < 3:
        raise ConfigError(f"per_class: {per_class} is too few, the demo needs 2 train and 1 test image per class")
    train = min(per_class - 1, max(2, round(per_class * TRAIN_PER_CLASS / total)))
    return train, per_class - train


def _write_png(pixels: np.ndarray, path: Path) -> None:
    """Write a greyscale PNG with no metadata, so the same pixels always give the same bytes."""
    Image.fromarray(pixels).save(path, format="PNG", optimize=False, compress_level=6)


def write_demo_data(
    root: str | os.PathLike, classes: int | None = None, per_class: int | None = None
) -> dict[str, int]:
    """Write the demo dataset under ``root`` (train, test and heldout folders); returns the counts.

    ``classes`` keeps the first N known and the first N held-out classes, ``per_class``
    the first N drawings of each class (at least 3), both for quick runs. ``root`` must be
    missing or empty: it is written whole, atomically, or not at all, and the same
    arguments always give the same files, byte for byte.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root}: exists and is not an empty folder; refusing to write the demo dataset into it")
    if classes is not None and classes < 1:
        raise ConfigError(f"classes: {classes} is too few, at least 1 is needed")
    data = load_slice()
    total = data["images"].shape[1]
    n_train, n_test = split_sizes(per_class, total)
    n_heldout = total if per_class is None else min(per_class, total)
    known = np.flatnonzero(~data["heldout"])[:classes]
    heldout = np.flatnonzero(data["heldout"])[:classes]
    parts = [("train", known, range(n_train)), ("test", known, range(n_train, n_train + n_test)),
             ("heldout", heldout, range(n_heldout))]
    counts = {"known_classes": len(known), "heldout_classes": len(heldout)}
    with atomic_dir(root) as tmp:
        for part, rows, drawings in parts:
            for row in rows:
                folder = tmp / part / str(data["classes"][row])
                folder.mkdir(parents=True)
                for i in drawings:
                    _write_png(data["images"][row, i], folder / f"{i:02d}.png")
            counts[part] = len(rows) * len(drawings)
    return {key: counts[key] for key in ("train", "test", "heldout", "known_classes", "heldout_classes")}
