"""Reading class-folder datasets and decoding images with Pillow."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ImageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".pnm"}
)


@dataclass
class ImageFolder:
    """The images of a class-folder dataset, in a deterministic order.

    ``labels[i]`` indexes ``class_names`` for ``paths[i]``; ``skipped`` lists
    ``(path, reason)`` for files that were not used.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_names(self) -> list[str]:
        """The class name of every image."""
        return [self.class_names[i] for i in self.labels]


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def scan_folder(root: str | os.PathLike) -> ImageFolder:
    """List a ``root/<class>/<image>`` folder; non-image files are skipped and reported.

    Classes and files are sorted by name, so the order is the same on every machine.
    Symbolic links that point outside ``root`` are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected <folder>/<class>/<image>)")
    real_root = root.resolve()
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not class_dirs:
        raise DatasetError(
            f"{root}: no class sub-folders; expected one sub-folder per class, "
            f"e.g. {root}/<class name>/<image>.jpg"
        )
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for class_dir in class_dirs:
        if not _is_inside(class_dir, real_root):
            skipped.append((str(class_dir), "link points outside the dataset folder"))
            continue
        files = sorted((f for f in class_dir.iterdir() if f.is_file()), key=lambda f: f.name)
        kept = []
        for f in files:
            if f.name.startswith("."):
                continue
            if not _is_inside(f, real_root):
                skipped.append((str(f), "link points outside the dataset folder"))
            elif f.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(f), "not an image file type"))
            else:
                kept.append(str(f))
        if not kept:
            continue
        names.append(class_dir.name)
        paths.extend(kept)
        labels.extend([len(names) - 1] * len(kept))
    if not paths:
        raise DatasetError(f"{root}: no image files found in its class sub-folders")
    return ImageFolder(root, paths, np.asarray(labels, dtype=np.int64), names, skipped)


def decode_image(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """Decode an image to a ``(size, size, 3)`` uint8 RGB array.

    ``source`` is a path or the encoded bytes. EXIF orientation is applied, any
    mode (greyscale, palette, RGBA, 16-bit, CMYK) becomes RGB.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels, over Pillow's limit")
            image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = array.max() or 1.0
                image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None
