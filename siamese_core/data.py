"""Reading class-folder datasets and decoding images with Pillow."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ImageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".pnm"}
)
# Images with more pixels than this are refused from their header, before any decoding
# ($SIAMESE_MAX_IMAGE_PIXELS overrides it): 40 megapixels holds an 8K frame or a 7000x5000 photo.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

UNKNOWN = "unknown"  # the label of an image of no known class (rejection); no class may be named so

# Why scan_folder passed over a file or folder: code -> what it means.
SKIP_REASONS = {
    "not_image": "not an image file type",
    "outside_link": "link points outside the dataset folder",
    "broken_link": "link is broken or loops back on itself",
    "hidden": "name starts with a dot (hidden)",
    "nested_folder": "folder inside a class folder (images must sit directly in the class folder)",
    "loose_file": "file outside any class folder",
    "bad_name": "name is not valid UTF-8",
}


def max_image_pixels() -> int:
    """The pixel limit for every image decoded or validated: ``$SIAMESE_MAX_IMAGE_PIXELS`` or the default."""
    value = os.environ.get("SIAMESE_MAX_IMAGE_PIXELS", "")
    try:
        return int(value) if value else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise ImageError(f"SIAMESE_MAX_IMAGE_PIXELS={value!r} is not a whole number of pixels") from None


class PixelBudget:
    """A bound on the pixels being decoded at once, across threads: each decoding holds its image's
    pixels and waits until they fit. An image larger than the whole budget waits to decode alone."""

    def __init__(self, pixels: int):
        if pixels < 1:
            raise ImageError(f"a pixel budget must be at least 1 pixel, got {pixels}")
        self.capacity = self._free = pixels
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the block."""
        pixels = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


def printable(path: str | os.PathLike) -> str:
    """A path as text that any terminal or file can take: bytes that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
        return False
    return True


def _skip_reason(entry: Path, real_root: Path, want_dir: bool) -> str | None:
    """The SKIP_REASONS code for a folder entry that is not a usable class folder (``want_dir``) or image."""
    if printable(entry.name) != entry.name:
        return "bad_name"
    if entry.name.startswith("."):
        return "hidden"
    if entry.is_symlink() and not entry.exists():
        return "broken_link"
    if not _is_inside(entry, real_root):
        return "outside_link"
    if entry.is_dir():
        return None if want_dir else "nested_folder"
    if want_dir:
        return "loose_file"
    return None if entry.suffix.lower() in IMAGE_SUFFIXES else "not_image"


def _worth_reporting(entry: Path, reason: str) -> bool:
    """Hidden files (.DS_Store, .gitignore) are passed over without a word; everything else is reported."""
    return not (reason == "hidden" and not entry.is_dir())


def folder_digest(folder: ImageFolder) -> str:
    """A short digest of a folder's images: their paths within it, labels, sizes and modification times."""
    digest = hashlib.sha256()
    for path, label in zip(folder.paths, folder.label_names):
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder.root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def scan_folder(root: str | os.PathLike) -> ImageFolder:
    """List a ``root/<class>/<image>`` folder; what is passed over is listed in ``skipped``.

    Classes and files are sorted by name, so the order is the same on every machine.
    ``skipped`` holds ``(path, code)`` pairs, the codes of :data:`SKIP_REASONS`: non-image
    files, hidden entries, nested folders, links that leave ``root``, break or loop, and
    names that are not valid UTF-8 (the path is then shown with ``\\xNN`` escapes).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{printable(root)}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{printable(root)}: not a folder (expected <folder>/<class>/<image>)")
    real_root = root.resolve()
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    class_dirs = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        reason = _skip_reason(entry, real_root, want_dir=True)
        if reason is None:
            class_dirs.append(entry)
        elif _worth_reporting(entry, reason):
            skipped.append((printable(entry), reason))
    if not class_dirs:
        raise DatasetError(
            f"{printable(root)}: no class sub-folders; expected one sub-folder per class, "
            f"e.g. {printable(root)}/<class name>/<image>.jpg"
        )
    for class_dir in class_dirs:
        kept = []
        for f in sorted(class_dir.iterdir(), key=lambda e: e.name):
            reason = _skip_reason(f, real_root, want_dir=False)
            if reason is None:
                kept.append(str(f))
            elif _worth_reporting(f, reason):
                skipped.append((printable(f), reason))
        if not kept:
            continue
        names.append(class_dir.name)
        paths.extend(kept)
        labels.extend([len(names) - 1] * len(kept))
    if not paths:
        raise DatasetError(f"{printable(root)}: no image files found in its class sub-folders")
    return ImageFolder(root, paths, np.asarray(labels, dtype=np.int64), names, skipped)


def colour_share(paths: list[str], sample: int = 24) -> float:
    """The share of up to ``sample`` evenly spaced images of ``paths`` that are in colour (their channels differ
    somewhere); unreadable ones are left out. 0.0 for none read."""
    picked = paths[:: max(1, len(paths) // sample)][:sample]
    colour = read = 0
    for path in picked:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.int16)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        read += 1
        colour += bool(np.abs(pixels[..., 0] - pixels[..., 1]).max() > 8 or np.abs(pixels[..., 1] - pixels[..., 2]).max() > 8)
    return colour / read if read else 0.0


def _to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
    ImageOps.exif_transpose(image, in_place=True)  # a copy would hold the full-size image twice
    if image.mode in ("L", "RGB"):  # resize first: the full-size image is never converted
        image = image.resize((size, size), Image.Resampling.BILINEAR)
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


def decode_image(source: str | os.PathLike | bytes, size: int, max_pixels: int | None = None,
                 budget: PixelBudget | None = None) -> np.ndarray:
    """Decode an image to a ``(size, size, 3)`` uint8 RGB array.

    ``source`` is a path or the encoded bytes. An image of more than ``max_pixels``
    (default :func:`max_image_pixels`) is refused from its header, before decoding; with
    ``budget``, decoding waits until the image's pixels fit in it. A JPEG is decoded at the
    smallest scale still at least ``size``; greyscale and RGB images are resized before any
    conversion, so a large one is held once, at one byte per pixel and channel. EXIF
    orientation is applied, any mode (greyscale, palette, RGBA, 16-bit, CMYK) becomes RGB.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else printable(source)
    limit = max_pixels or max_image_pixels()
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as opened:
            image: Image.Image = opened
            if image.width * image.height > limit:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels, over the limit of "
                                                   f"{limit} (SIAMESE_MAX_IMAGE_PIXELS)")
            with budget.hold(image.width * image.height) if budget is not None else nullcontext():
                return _to_rgb_array(image, size)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None
