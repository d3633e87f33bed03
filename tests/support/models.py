"""Models and the registry: a tiny trained bundle, a tiny untrained recogniser with held-out classes,
a per-test SQLite MLflow store, and registering a bundle as the register stage does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.params import PipelineParams
from siamese_core.config import Config, apply_overrides
from siamese_core.data import ImageFolder, scan_folder
from siamese_core.model import initial_embedding_model
from siamese_core.recognizer import SiameseRecognizer, build_gallery
from siamese_core.train import train

from support.images import make_digits_dataset
from support.tiny import TINY_MODEL


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


def untrained_recognizer(
    root: Path, **overrides
) -> tuple[SiameseRecognizer, ImageFolder, ImageFolder, ImageFolder]:
    """A tiny untrained recogniser over digits 0-2, with its train, test and held-out (3-4) folders.

    The seed is set as training sets it, so this network is also the untrained baseline.
    """
    train_dir, test_dir = make_digits_dataset(root / "known", classes=3)
    heldout_dir, _ = make_digits_dataset(root / "new", classes=2, train_per_class=6, test_per_class=0, first=3)
    config = apply_overrides(Config(), {**TINY_MODEL, **overrides})
    embedding = initial_embedding_model(config)
    train_folder = scan_folder(train_dir)
    recognizer = SiameseRecognizer(embedding, build_gallery(embedding, train_folder), config)
    return recognizer, train_folder, scan_folder(test_dir), scan_folder(heldout_dir)


def use_sqlite_store(monkeypatch, root: Path) -> str:
    """Point MLflow at a fresh SQLite database under ``root`` (for this test only)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def logged_scorer(metric: str = "top1"):
    """A champion scorer for registrations that share one test split: the champion's own logged figure."""
    from pipelines.gate import Scores
    from pipelines.tracking import client

    return lambda champion: Scores(client().get_run(champion.run_id).data.metrics[metric])


def pipeline_params(model_name: str = "tiny-recognizer", **register) -> PipelineParams:
    """Pipeline params with the tiny model and the given ``register`` options."""
    overrides = {**TINY_MODEL, "register.model_name": model_name}
    overrides.update({f"register.{key}": value for key, value in register.items()})
    return apply_overrides(PipelineParams(), overrides)


def register_bundle(params: PipelineParams, bundle_dir: Path, metrics: dict, history: dict[str, list[float]],
                    artifacts: list, tags: dict[str, str], **gate) -> dict:
    """Register a bundle as the register stage does, in a run of its own: opened, its training curve
    logged, ended FINISHED (FAILED if registering fails). ``gate``: score_champion, baselines."""
    from pipelines import registry
    from pipelines.tracking import pipeline_run

    with pipeline_run(params) as scope:
        scope.stage = "register"
        scope.run.log_history(history)
        return registry.log_and_register(scope.run, params, bundle_dir, metrics, artifacts, tags, **gate)
