"""What the serving benchmarks share: the demo's bundle registered as ``models:/bench@champion`` in a temporary
MLflow store, a free loopback port, and waiting for a server to answer /ping."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register_demo_bundle(store: Path, bundle: Path = ROOT / "artifacts" / "bundle") -> str:
    """Register ``bundle`` (by default the demo's, from `dvc repro`) as bench@champion in a SQLite store under
    ``store``; returns the tracking URI (also set in this process's environment)."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    from pipelines import registry
    from pipelines.tracking import client, ensure_experiment

    run = client().create_run(ensure_experiment("benchmark")).info.run_id
    version = registry.register_bundle(run, "bench", bundle)
    client().set_terminated(run)
    client().set_registered_model_alias("bench", "champion", version)
    return os.environ["MLFLOW_TRACKING_URI"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_ping(port: int, seconds: float = 120) -> None:
    """Return once the server on ``port`` answers /ping (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            return
        except OSError:
            time.sleep(0.5)


def seed_bundle(folder: Path) -> Path:
    """The seed architecture (ResNet50 at 200 px, the 512-256-256 head; untrained, as no ImageNet weights can be
    fetched here: the cost is the same) with a gallery of the demo's training images, saved under ``folder``."""
    from siamese_core.config import Config, apply_overrides
    from siamese_core.data import scan_folder
    from siamese_core.model import initial_embedding_model
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    config = apply_overrides(Config(), {"model.weights": None})
    network = initial_embedding_model(config)
    gallery = build_gallery(network, scan_folder(ROOT / "data" / "demo" / "train"), config.evaluate)
    return SiameseRecognizer(network, gallery, config).save(folder / "seed-bundle")
