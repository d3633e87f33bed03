"""The seed library's two functions, with their original signatures."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from .config import Config, apply_overrides
from .data import scan_folder
from .gallery import Gallery
from .io import atomic_path
from .recognizer import (
    CONFIG_FILE,
    GALLERY_FILE,
    METADATA_FILE,
    MODEL_FILE,
    SiameseRecognizer,
    build_gallery,
    save_trained_bundle,
)
from .train import train


def generate_model(test_file, train_file, save_path, epochs, **overrides) -> dict[str, list[float]]:
    """Train on ``train_file``, validate on ``test_file``, save a bundle at ``save_path`` (the seed's signature).

    ``train_file`` and ``test_file`` are folders of class sub-folders (``<folder>/<class>/<image>``),
    not files: the names are the seed library's.

    ``overrides`` are config keys, e.g. ``weights=None, backbone="small_cnn"``.
    Returns the history: ``{"loss": [...], "val_loss": [...]}`` per epoch.
    """
    config = apply_overrides(Config(), {**overrides, "train.epochs": int(epochs)})
    result = train(config, train_file, test_file)
    save_trained_bundle(result.embedding, result.train_folder, config, save_path,
                        {"history": result.history, "best_epoch": result.best_epoch})
    return result.history


def _cache_dir() -> Path:
    root = os.environ.get("SIAMESE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "siamese"
    )
    return Path(root)


def _file_identity(path) -> str:
    """A file's path, inode, size and change and modification times: a rewrite changes the change time
    (ctime), which no tool can set back, even when it restores the size and modification time."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_ino}|{stat.st_size}|{stat.st_ctime_ns}|{stat.st_mtime_ns}\n"


def _gallery_cache_key(model_path: Path, folder) -> str:
    """Hash of the bundle's own files and the gallery folder's files (see :func:`_file_identity`)."""
    digest = hashlib.sha256()
    for name in (MODEL_FILE, METADATA_FILE, CONFIG_FILE, GALLERY_FILE):
        digest.update(_file_identity(model_path / name).encode())
    for path in folder.paths:
        digest.update(_file_identity(path).encode())
    digest.update(json.dumps(folder.class_names).encode())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def _recognizer_with_gallery(model_path: str, train_dataset_path: str, key: str) -> SiameseRecognizer:
    """The bundle loaded once per process with the gallery of ``train_dataset_path``.

    ``key`` is :func:`_gallery_cache_key`: a changed bundle or folder makes a new key, so
    a stale recogniser is never returned. The gallery itself is also cached on disk.
    """
    recognizer = SiameseRecognizer.load(model_path)
    cache = _cache_dir() / f"gallery-{key}.npz"
    if cache.is_file():
        recognizer.gallery = Gallery.load(cache)
    else:
        folder = scan_folder(train_dataset_path)
        recognizer.gallery = build_gallery(recognizer.embedding, folder, recognizer.config.evaluate)
        with atomic_path(cache) as tmp:
            recognizer.gallery.save(tmp)
    return recognizer


def test_prediction(image_path, model_path, train_dataset_path) -> tuple[str, float]:
    """Recognise ``image_path`` against a gallery built from ``train_dataset_path``.

    Returns ``(class_name, squared_distance)``. The gallery is cached on disk, keyed by the
    bundle and the folder's files, and the loaded recogniser is kept in the process under
    the same key, so in a loop every call after the first costs one prediction.
    """
    key = _gallery_cache_key(Path(model_path), scan_folder(train_dataset_path))
    recognizer = _recognizer_with_gallery(str(Path(model_path).resolve()), str(train_dataset_path), key)
    match = recognizer.predict_one(image_path, top_k=1)
    return match.label, match.distance


test_prediction.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
