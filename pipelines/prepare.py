"""The demo dataset: scikit-learn's handwritten digits written as class folders of PNG images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from siamese_core.errors import DatasetError
from siamese_core.io import atomic_dir

MARKER = ".prepared.json"


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a non-empty folder that prepare did not write: it may be someone's data."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise DatasetError(
            f"{folder}: exists and was not written by the prepare stage; refusing to replace it "
            "(set data.prepare_source: none to use it as it is, or move it away)"
        )


def write_digits(
    train_dir: str | Path,
    test_dir: str | Path,
    image_size: int = 32,
    test_fraction: float = 0.3,
    seed: int = 0,
    per_class: int | None = None,
) -> dict[str, int]:
    """Write the 1,797 digits as ``<dir>/digit <n>/<index>.png``, upscaled to ``image_size``.

    The split is stratified and seeded (``test_fraction`` of each class goes to
    ``test_dir``); ``per_class`` keeps only the first images of each class. Each
    folder is replaced whole and atomically. Returns the image count of each split.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train_dir, test_dir = Path(train_dir), Path(test_dir)
    for folder in (train_dir, test_dir):
        _check_replaceable(folder)
    digits = load_digits()
    kept = np.concatenate([np.flatnonzero(digits.target == d)[:per_class] for d in range(10)])
    train_idx, test_idx = train_test_split(
        kept, test_size=test_fraction, stratify=digits.target[kept], random_state=seed
    )
    settings = {"source": "digits", "image_size": image_size, "test_fraction": test_fraction, "seed": seed, "per_class": per_class}
    with atomic_dir(train_dir) as train_tmp, atomic_dir(test_dir) as test_tmp:
        for tmp, indices in ((train_tmp, train_idx), (test_tmp, test_idx)):
            for index in sorted(indices):
                folder = tmp / f"digit {digits.target[index]}"
                folder.mkdir(exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR)
                image.save(folder / f"{index:04d}.png")
            (tmp / MARKER).write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
    return {"train": len(train_idx), "test": len(test_idx)}
