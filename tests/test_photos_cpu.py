"""The photos-cpu preset as a user runs it: `siamese train --preset photos-cpu` on colour photos, with no network."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image
from typer.testing import CliRunner

from pipelines.cli import app
from siamese_core.recognizer import SiameseRecognizer


def _photo_folders(root):
    """Two photographs, each a class of 4 training and 2 test crops (different parts, sizes and sides)."""
    rng = np.random.default_rng(0)
    for name in ("china", "flower"):
        photo = Image.fromarray(load_sample_image(f"{name}.jpg"))
        for i in range(6):
            side = int(rng.uniform(0.5, 0.9) * photo.height)
            left, top = int(rng.uniform(0, photo.width - side)), int(rng.uniform(0, photo.height - side))
            crop = photo.crop((left, top, left + side, top + side)).resize((120, 120))
            folder = root / ("train" if i < 4 else "test") / name
            folder.mkdir(parents=True, exist_ok=True)
            (crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop).save(folder / f"{i}.jpg")
    return root / "train", root / "test"


def test_photos_cpu_trains_offline_and_recognises_the_photos(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    train_dir, test_dir = _photo_folders(tmp_path)
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["train", "--preset", "photos-cpu", "--epochs", "2", "--train", str(train_dir),
                                      "--test", str(test_dir), "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    recognizer = SiameseRecognizer.load(bundle)
    assert (recognizer.config.model.backbone, recognizer.input_size) == ("efficientnet_lite0", 224)
    tests = sorted(test_dir.rglob("*.jpg"))
    assert [match.label for match in recognizer.predict(tests)] == [path.parent.name for path in tests]
