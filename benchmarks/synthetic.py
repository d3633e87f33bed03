"""Seeded synthetic data for the benchmarks: photo-like JPEG class folders, tiny image folders, clustered vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _scene(rng: np.random.Generator, palette: np.ndarray, layout: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """One photo of a class's 'landmark': a sky gradient, shapes in the class's colours, jitter, grain."""
    small_w, small_h = 320, 240
    top, bottom = palette[0] * rng.uniform(0.8, 1.2), palette[1] * rng.uniform(0.8, 1.2)
    ramp = np.linspace(0, 1, small_h)[:, None, None]
    sky = np.clip(top * (1 - ramp) + bottom * ramp, 0, 255).astype(np.uint8).repeat(small_w, axis=1)
    image = Image.fromarray(sky)
    draw = ImageDraw.Draw(image)
    dx, dy, scale = rng.uniform(-30, 30), rng.uniform(-20, 20), rng.uniform(0.85, 1.15)
    for (x, y, w, h, kind), colour in zip(layout, palette[2:]):
        box = [dx + x * scale, dy + y * scale, dx + (x + w) * scale, dy + (y + h) * scale]
        fill = tuple(int(c) for c in np.clip(colour * rng.uniform(0.85, 1.15), 0, 255))
        (draw.ellipse if kind > 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))).resize(size, Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 13, size=(size[1], size[0], 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def make_landmarks(root: str | Path, classes: int = 12, train_range=(8, 10), test_per_class: int = 2,
                   max_size=(3000, 2000), seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/{train,test}/<class>/<n>.jpg`` photo-like JPEGs of varying sizes up to ``max_size``."""
    root, rng = Path(root), np.random.default_rng(seed)
    for c in range(classes):
        palette = rng.uniform(0, 255, size=(8, 3))
        layout = np.column_stack([rng.uniform(0, 260, 6), rng.uniform(40, 200, 6), rng.uniform(20, 120, 6),
                                  rng.uniform(20, 120, 6), rng.uniform(0, 1, 6)])
        n_train = int(rng.integers(train_range[0], train_range[1] + 1))
        for i in range(n_train + test_per_class):
            split = "train" if i < n_train else "test"
            folder = root / split / f"landmark {c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            width = int(rng.integers(max_size[0] // 4, max_size[0] + 1))
            height = int(min(max_size[1], width * rng.choice([2 / 3, 3 / 4, 1.0])))
            _scene(rng, palette, layout, (width, height)).save(folder / f"{i:03d}.jpg", quality=90)
    return root / "train", root / "test"


def make_tiny_images(root: str | Path, count: int, classes: int = 100, size: int = 64, seed: int = 0) -> Path:
    """``count`` small JPEGs in ``classes`` folders (noise around a per-class colour)."""
    root, rng = Path(root), np.random.default_rng(seed)
    colours = rng.uniform(0, 255, size=(classes, 3))
    for i in range(count):
        c = i % classes
        folder = root / f"class {c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(colours[c] + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)
    return root


def clustered_vectors(rows: int, dim: int, per_class: int = 100, spread: float = 0.25, seed: int = 0):
    """``rows`` float32 vectors around ``rows // per_class`` unit-variance centres, with their labels and centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((rows // per_class, dim), dtype=np.float32)
    labels = np.repeat(np.arange(len(centres)), per_class)
    vectors = np.empty((len(labels), dim), dtype=np.float32)
    for start in range(0, len(labels), 100_000):
        part = labels[start : start + 100_000]
        vectors[start : start + len(part)] = centres[part] + spread * rng.standard_normal((len(part), dim), dtype=np.float32)
    return vectors, labels, centres
