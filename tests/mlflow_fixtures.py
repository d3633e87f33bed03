"""Shared helpers for the MLflow tests: a tiny trained bundle and a per-test SQLite store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from images import make_digits_dataset

from pipelines.params import PipelineParams
from siamese_core.config import Config, apply_overrides
from siamese_core.recognizer import SiameseRecognizer, build_gallery
from siamese_core.train import train

TINY_MODEL = {
    "weights": None,
    "backbone": "small_cnn",
    "input_size": 32,
    "head_units": [16],
    "embedding_dim": 8,
    "learning_rate": 1e-3,
    "epochs": 1,
    "train.batch_size": 16,
    "max_pairs_per_class": 10,
}


@dataclass
class TinyBundle:
    """A saved bundle, the images its gallery was built from, and its training history."""

    path: Path
    gallery_images: dict[str, list[str]]
    history: dict[str, list[float]]


def make_tiny_bundle(root: Path) -> TinyBundle:
    """Train the smallest network on 3 digit classes (a few seconds) and save its bundle."""
    train_dir, test_dir = make_digits_dataset(root / "data")
    config = apply_overrides(Config(), TINY_MODEL)
    result = train(config, train_dir, test_dir, verbose=0)
    folder = result.train_folder
    SiameseRecognizer(result.embedding, build_gallery(result.embedding, folder), config).save(root / "bundle")
    images: dict[str, list[str]] = {}
    for path, label in zip(folder.paths, folder.label_names):
        images.setdefault(label, []).append(path)
    return TinyBundle(root / "bundle", images, result.history)


def use_sqlite_store(monkeypatch, root: Path) -> str:
    """Point MLflow at a fresh SQLite database under ``root`` (for this test only)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pipeline_params(model_name: str = "tiny-recognizer", **register) -> PipelineParams:
    """Pipeline params with the tiny model and the given ``register`` options."""
    overrides = {**TINY_MODEL, "register.model_name": model_name}
    overrides.update({f"register.{key}": value for key, value in register.items()})
    return apply_overrides(PipelineParams(), overrides)
