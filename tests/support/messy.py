"""Deliberately broken and unusual image files, generated for bad-input tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def noise(seed: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    """A distinct random image (so content hashes differ)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write(path: Path, data: bytes | Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        data.save(path, **kwargs)
    return path


def make_messy_dataset(root: Path) -> dict[str, Path]:
    """train/test folders with one of each problem; returns the notable paths by name."""
    train, test = root / "train", root / "test"
    good = "Ärger mit Leerzeichen"
    paths = {
        "rgba": write(train / good / "rgba.png", noise(1, mode="RGBA")),
        "palette": write(train / good / "palette.png", noise(2, mode="P")),
        "deep": write(train / good / "deep16.png", Image.fromarray((np.arange(576).reshape(24, 24) * 100).astype(np.uint16))),
        "cmyk": write(train / "猫" / "cmyk.jpg", jpeg_bytes(noise(3, mode="CMYK"))),
        "rotated": write(train / "猫" / "rotated.jpg", noise(4), exif=_rotation_exif()),
        "truncated": write(train / "猫" / "cut.jpg", jpeg_bytes(noise(5, size=64))[:300]),
        "text": write(train / "猫" / "notes.jpg", b"this is text, not a JPEG"),
        "empty": write(train / "猫" / "empty.png", b""),
        "bomb": write(train / "猫" / "huge.png", png_claiming(30000, 30000)),
        "readme": write(train / "猫" / "README.txt", b"labels by hand"),
        "single": write(train / "lonely" / "only.png", noise(6)),
        "duplicate": write(train / good / "copy of rgba.png", (train / good / "rgba.png").read_bytes()),
        "tiny": write(train / good / "tiny.png", noise(7, size=4)),
        "leak": write(test / good / "leaked.png", (train / good / "palette.png").read_bytes()),
        "test_ok": write(test / "猫" / "fine.png", noise(8)),
        "unknown": write(test / "stranger" / "new.png", noise(9)),
    }
    outside = write(root / "outside.png", noise(10))
    paths["link"] = train / good / "link.png"
    paths["link"].symlink_to(outside)
    return paths


def _rotation_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()
