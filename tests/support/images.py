"""Small real image datasets for tests, written as class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def make_digits_dataset(
    root: str | Path, classes: int = 3, train_per_class: int = 6, test_per_class: int = 3, size: int = 32,
    first: int = 0,
) -> tuple[Path, Path]:
    """Write scikit-learn's handwritten digits ``first`` .. ``first + classes - 1`` as
    ``root/{train,test}/digit <n>/<i>.png``.

    Returns ``(train_dir, test_dir)``. Class names contain a space on purpose.
    """
    root = Path(root)
    digits = load_digits()
    for digit in range(first, first + classes):
        indices = np.flatnonzero(digits.target == digit)[: train_per_class + test_per_class]
        for position, index in enumerate(indices):
            split = "train" if position < train_per_class else "test"
            folder = root / split / f"digit {digit}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{index:04d}.png")
    return root / "train", root / "test"
