"""The model bundle on disk and the recogniser that loads it."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .config import Config, EvaluateConfig, validate_config
from .data import UNKNOWN, ImageFolder, scan_folder
from .embed import ImageSource, embed_images
from .errors import BundleError, ConfigError, DatasetError
from .gallery import Gallery, Match, file_digests
from .io import atomic_dir, atomic_path
from .model import load_embedding
from .openset import class_scales, rejection_on, unknown_scores
from .sharding import Sharder

BUNDLE_FORMAT = 1
MODEL_FILE, GALLERY_FILE, CONFIG_FILE, METADATA_FILE = "model.keras", "gallery.npz", "config.json", "metadata.json"
ONDISK_INDEX_DIR = Gallery.ondisk_files(GALLERY_FILE)[1].name  # a large gallery's index, beside gallery.npz


def _versions() -> dict[str, str]:
    import tensorflow as tf

    from . import __version__

    return {
        "siamese_core": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def build_gallery(embedding: keras.Model, folder: ImageFolder, settings: EvaluateConfig | None = None,
                  progress: bool = False, sharder: Sharder | None = None,
                  model_file: str | os.PathLike | None = None) -> Gallery:
    """Embed every image of a class folder once, in batches (with the test-time views of ``settings``), into a
    gallery; with a ``sharder`` and the network's ``model_file``, in shards where the sharder runs them."""
    settings = settings or EvaluateConfig()
    embeddings = embed_images(embedding, folder.paths, settings.embed_batch_size, progress=progress,
                              views=settings.test_time_views, shift=settings.test_time_shift, sharder=sharder,
                              model_file=model_file)
    return Gallery(embeddings, folder.labels, list(folder.class_names), list(folder.paths),
                   digests=file_digests(list(folder.paths)))


def save_trained_bundle(embedding: keras.Model, train_folder: ImageFolder, config: Config, path: str | os.PathLike,
                        metadata: dict | None = None, progress: bool = False, sharder: Sharder | None = None,
                        model_file: str | os.PathLike | None = None) -> SiameseRecognizer:
    """The one way from a training to a bundle: embed the training images into the gallery and save it all at
    ``path`` (in shards with a ``sharder`` and the file the network was loaded from, see :func:`build_gallery`)."""
    gallery = build_gallery(embedding, train_folder, config.evaluate, progress, sharder, model_file)
    recognizer = SiameseRecognizer(embedding, gallery, config)
    recognizer.save(path, metadata)
    return recognizer


class SiameseRecognizer:
    """A trained embedding model plus its gallery: recognises images by nearest class."""

    def __init__(self, embedding: keras.Model, gallery: Gallery, config: Config, metadata: dict | None = None,
                 model_file: str | os.PathLike | None = None, sharder: Sharder | None = None):
        """``model_file``: where ``embedding`` is saved; with a ``sharder`` too, large sets of image files are
        embedded in shards where the sharder runs them (a Dask cluster)."""
        self.embedding = embedding
        self._config = config
        self.gallery = gallery
        self.metadata = metadata or {}
        self.model_file = model_file
        self.sharder = sharder

    def _like_this(self, gallery: Gallery, config: Config) -> SiameseRecognizer:
        return SiameseRecognizer(self.embedding, gallery, config, dict(self.metadata), self.model_file, self.sharder)

    def with_sharder(self, sharder: Sharder | None) -> SiameseRecognizer:
        """This recogniser embedding large sets of image files through ``sharder`` (None: in this process)."""
        return SiameseRecognizer(self.embedding, self._gallery, self.config, dict(self.metadata), self.model_file, sharder)

    @property
    def config(self) -> Config:
        """The library config. Its search settings (``evaluate``) are fixed for this recogniser's life:
        :meth:`with_settings` gives a recogniser that searches with others."""
        return self._config

    def with_settings(self, evaluate: EvaluateConfig | None = None, **changes: Any) -> SiameseRecognizer:
        """A recogniser with the same network and embeddings that searches with ``evaluate`` (default: these
        settings) with ``changes`` applied, e.g. ``with_settings(match="class_mean", top_k=3)``."""
        settings = (evaluate or self.config.evaluate).model_dump()
        config = self.config.model_copy(update={"evaluate": validate_config(EvaluateConfig, {**settings, **changes})})
        return self._like_this(self._gallery, config)

    @property
    def gallery(self) -> Gallery:
        """The reference embeddings; searched with the config's exact-search limit, ``nprobe`` and ``match``."""
        return self._gallery

    @gallery.setter
    def gallery(self, gallery: Gallery) -> None:
        self._gallery = self.searched(gallery)
        self._scales: np.ndarray | None = None  # per-class scales of the class_scaled unknown score, computed on use

    def searched(self, gallery: Gallery) -> Gallery:
        """``gallery`` (a copy, when its settings differ) set to be searched the way this recogniser searches
        (``config.evaluate``)."""
        settings = self.config.evaluate
        wanted = (settings.exact_search_max_rows, settings.nprobe, settings.match == "class_mean")
        if (gallery.index_threshold, gallery.nprobe, gallery.class_means) == wanted:
            return gallery
        return replace(gallery, index_threshold=wanted[0], nprobe=wanted[1], class_means=wanted[2])

    @property
    def input_size(self) -> int:
        """Side of the square images the network takes."""
        return int(self.embedding.input_shape[1])

    def embed(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Embed image paths, encoded bytes or uint8 arrays, in batches, with the config's test-time views."""
        settings = self.config.evaluate
        return embed_images(self.embedding, list(images), settings.embed_batch_size, views=settings.test_time_views,
                            shift=settings.test_time_shift, sharder=self.sharder, model_file=self.model_file)

    def classify_among(self, enrolled: np.ndarray, enrolled_labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """The label of each query embedding among a set of enrolled embeddings, searched as this recogniser
        searches its gallery: the few-shot episodes' path, the same as :meth:`enroll` then :meth:`predict`."""
        classes, labels = np.unique(enrolled_labels, return_inverse=True)
        gallery = Gallery(enrolled, labels, [str(i) for i in range(len(classes))], [""] * len(enrolled))
        return classes[[int(m.label) for m in self.searched(gallery).search(queries, 1)]]

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold on the unknown score beyond which an image is of an unknown class, if any."""
        value = self.metadata.get("threshold")
        return None if value is None else float(value)

    @property
    def calibration(self) -> dict:
        """How :attr:`threshold` was calibrated: its ``score``, operating point, rates and ``target_met``."""
        return self.metadata.get("threshold_calibration") or {}

    def rejects_unknown(self, reject: bool | str | None = None) -> bool:
        """Whether predictions answer ``unknown``: ``reject``, else ``config.evaluate.reject_unknown``; "auto"
        is on when the bundle's calibration met its target."""
        setting = self.config.evaluate.reject_unknown if reject is None else reject
        if setting == "auto" and self.threshold is None:
            return False
        return rejection_on(setting, self.calibration)

    def unknown_scores(self, queries: np.ndarray, matches: list[Match]) -> np.ndarray:
        """The calibrated unknown score of each query embedding (matches searched with at least two classes)."""
        kind = self.calibration.get("score", "nearest")
        if kind == "class_scaled" and self._scales is None:
            self._scales = class_scales(self.gallery)
        return unknown_scores(kind, self.gallery, queries, matches, self._scales)

    def predict(
        self, images: Sequence[ImageSource], top_k: int | None = None, reject: bool | str | None = None
    ) -> list[Match]:
        """The nearest gallery class of each image, with its squared distance and the top-k classes.

        When unknowns are rejected (:meth:`rejects_unknown`), each match carries its unknown score and an
        image scoring above :attr:`threshold` gets the label ``UNKNOWN``; its distance and top-k are kept.
        """
        return self.match(self.embed(images), top_k, reject)

    def match(self, queries: np.ndarray, top_k: int | None = None, reject: bool | str | None = None) -> list[Match]:
        """:meth:`predict` for query embeddings already made by :meth:`embed`."""
        k = top_k or self.config.evaluate.top_k
        matches = self.gallery.search(queries, max(k, 2))  # the ratio score reads the second class
        if not self.rejects_unknown(reject):
            return [replace(m, top_k=m.top_k[:k]) for m in matches]
        if self.threshold is None:
            raise BundleError("rejecting unknown classes needs a calibrated threshold in the bundle's metadata; "
                              "run the evaluate stage or set one with store_threshold")
        return [replace(m, label=UNKNOWN if score > self.threshold else m.label, top_k=m.top_k[:k],
                        unknown_score=float(score))
                for m, score in zip(matches, self.unknown_scores(queries, matches))]

    def predict_one(self, image: ImageSource, top_k: int | None = None, reject: bool | None = None) -> Match:
        """Recognise a single image."""
        return self.predict([image], top_k, reject)[0]

    def enroll(self, folder: str | os.PathLike | ImageFolder) -> SiameseRecognizer:
        """Add a class folder's images to the gallery (new classes or more images), without retraining."""
        folder = folder if isinstance(folder, ImageFolder) else scan_folder(folder)
        if UNKNOWN in folder.class_names:
            raise DatasetError(f"{folder.root}: a class is named '{UNKNOWN}', the label given to images of no known "
                               "class; rename the folder")
        embeddings = self.embed(folder.paths)
        self.gallery = self.gallery.extend(embeddings, folder.label_names, folder.paths)
        return self

    def with_gallery(self, folder: str | os.PathLike | ImageFolder, progress: bool = False) -> SiameseRecognizer:
        """A recogniser with the same network and a gallery built from ``folder``."""
        folder = folder if isinstance(folder, ImageFolder) else scan_folder(folder)
        gallery = build_gallery(self.embedding, folder, self.config.evaluate, progress, self.sharder, self.model_file)
        return self._like_this(gallery, self.config)

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
        """Write the bundle folder atomically: model, gallery, config and metadata."""
        metadata = {
            **self.metadata,
            **(extra_metadata or {}),
            "format": BUNDLE_FORMAT,
            "class_names": self.gallery.class_names,
            "gallery_size": len(self.gallery),
            "input_size": self.input_size,
            "backbone": self.config.model.backbone,
            "embedding_dim": int(self.embedding.output_shape[-1]),
            "versions": _versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        gallery = self.gallery
        ondisk = gallery.ondisk_dir is not None or len(gallery) >= self.config.evaluate.ondisk_min_rows
        with atomic_dir(path) as tmp:
            self.embedding.save(tmp / MODEL_FILE)
            if ondisk and gallery.ondisk_dir is None:  # large: the bundle carries an on-disk index
                gallery = gallery.with_ondisk_index(tmp / ONDISK_INDEX_DIR)
            gallery.save(tmp / GALLERY_FILE)
            (tmp / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2), encoding="utf-8")
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
        self.metadata = metadata
        if ondisk:  # search the index now in the bundle
            self.gallery = Gallery.load(Path(path) / GALLERY_FILE)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, sharder: Sharder | None = None) -> SiameseRecognizer:
        """Restore a bundle written by :meth:`save` (embedding large image sets through ``sharder``, if given)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError.not_a_folder(path)
        missing = [name for name in (MODEL_FILE, GALLERY_FILE, CONFIG_FILE, METADATA_FILE) if not (path / name).is_file()]
        if missing:
            raise BundleError(f"{path}: not a model bundle (missing {', '.join(missing)})")
        metadata = _read_json_object(path / METADATA_FILE)
        if metadata.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"{path}: bundle format {metadata.get('format')} is not supported by this version "
                f"(format {BUNDLE_FORMAT}); retrain it with 'siamese train'"
            )
        try:
            config = validate_config(Config, _read_json_object(path / CONFIG_FILE))
        except ConfigError as exc:
            raise BundleError(f"{path}: its config.json does not fit this version ({exc}); retrain it") from None
        try:
            embedding = load_embedding(path / MODEL_FILE)
        except BundleError:
            raise
        except Exception as exc:  # Keras reports a damaged zip in many ways (BadZipFile, KeyError, "File not found")
            raise BundleError(f"{path / MODEL_FILE}: not a readable Keras model ({type(exc).__name__}); the bundle is "
                              "damaged: copy it again or retrain") from None
        return cls(embedding, Gallery.load(path / GALLERY_FILE), config, metadata, path / MODEL_FILE, sharder)


def _read_json_object(file: Path) -> dict:
    """A bundle's JSON file as a dict; BundleError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON ({type(exc).__name__}); the bundle is damaged") from None
    if not isinstance(data, dict):
        raise BundleError(f"{file}: expected a JSON object, found {type(data).__name__}; the bundle is damaged")
    return data


def store_threshold(path: str | os.PathLike, threshold: float, calibration: dict | None = None) -> None:
    """Record the unknown-class threshold (and how it was calibrated) in a bundle's metadata.json, atomically."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise BundleError(f"{path}: not a model bundle (missing {METADATA_FILE})")
    metadata = json.loads(file.read_text(encoding="utf-8"))
    metadata.update({"threshold": float(threshold), "threshold_calibration": calibration or {}})
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
