"""Reading class folders and decoding every image format to RGB."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from siamese_core.data import decode_image, scan_folder
from siamese_core.errors import DatasetError, ImageError


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_scan_is_sorted_and_keeps_unicode_class_names(tmp_path):
    for name in ["zebra", "Ärger mit Leerzeichen", "猫"]:
        for i in (2, 1):
            _save(tmp_path / name / f"{i}.png", Image.new("RGB", (8, 8)))
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    folder = scan_folder(tmp_path)
    assert folder.class_names == sorted(["zebra", "Ärger mit Leerzeichen", "猫"])
    assert [os.path.basename(p) for p in folder.paths[:2]] == ["1.png", "2.png"]
    assert folder.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert folder.skipped == [(str(tmp_path / "zebra" / "notes.txt"), "not_image")]


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    _save(tmp_path / "flat" / "a.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DatasetError, match=r"flat: no class sub-folders.*<class name>"):
        scan_folder(tmp_path / "flat")


def test_scan_skips_links_outside_the_folder(tmp_path):
    outside = _save(tmp_path / "outside.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "data" / "a" / "1.png", Image.new("RGB", (8, 8)))
    (tmp_path / "data" / "a" / "2.png").symlink_to(outside)
    folder = scan_folder(tmp_path / "data")
    assert len(folder) == 1
    assert folder.skipped[0][1] == "outside_link"


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("L", "PPM"), ("CMYK", "JPEG")],
)
def test_every_mode_and_format_decodes_to_rgb(tmp_path, mode, fmt):
    path = _save(tmp_path / f"image.{fmt.lower()}", Image.new(mode, (20, 10)), format=fmt)
    array = decode_image(path, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_sixteen_bit_png_keeps_its_contrast(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(ramp))
    array = decode_image(path, 64)
    assert array.min() < 10 and array.max() > 245


def test_transparent_pixels_become_white(tmp_path):
    path = _save(tmp_path / "clear.png", Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    assert (decode_image(path, 8) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "black")
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path / "rotated.jpg", image, exif=exif.tobytes(), quality=95)
    array = decode_image(path, 20)
    assert array[:8].mean() > 200 and array[-8:].mean() < 50  # white half now on top


def test_bytes_decode_like_files(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), 4)[0, 0].tolist() == [10, 20, 30]


def test_values_stay_in_0_255(tmp_path):
    path = _save(tmp_path / "white.png", Image.new("RGB", (8, 8), (255, 255, 255)))
    array = decode_image(path, 8)
    assert array.max() == 255  # not scaled to [0, 1]: each backbone scales for itself


def test_bad_files_are_reported_by_name(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[:200])
    for path in (text, empty, truncated):
        with pytest.raises(ImageError, match=str(path.name)):
            decode_image(path, 8)
    with pytest.raises(ImageError, match="file not found"):
        decode_image(tmp_path / "nope.png", 8)


DECODE_PEAK = """
import resource, sys
from siamese_core.data import decode_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
array = decode_image(sys.argv[1], 32)
print(array.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 6000x6000 JPEG (108 MB as full RGB) is decoded at 1/8 scale: the process grows by a few MB."""
    path = tmp_path / "large.jpg"
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(path, quality=90)
    result = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(path)], capture_output=True, text=True, check=True)
    shape, grown_kib = result.stdout.rsplit(" ", 1)
    assert shape == "(32, 32, 3)" and int(grown_kib) < 30 * 1024, result.stdout
