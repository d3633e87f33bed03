"""Evaluating a recogniser: embed the test (and held-out) images, score them with the figures
of ``siamese_core.metrics``, and run the two baselines (raw pixels, the untrained network)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .config import Config
from .data import ImageFolder, scan_folder
from .errors import DatasetError
from .gallery import Gallery, Match
from .metrics import (
    accuracy_report,
    cross_fitted_calibration,
    few_shot_report,
    map_at_r,
    open_set_report,
)

# Raw-pixel baseline images are at most this side, so a 200 px model's baseline stays small in memory.
RAW_PIXELS_MAX_SIZE = 64


def score_queries(queries: np.ndarray, true_labels: list[str], gallery: Gallery, top_k: int) -> tuple[dict, list[Match]]:
    """The accuracy report plus MAP@R of query embeddings against a gallery, and the matches."""
    matches = gallery.search(queries, top_k)
    report = accuracy_report(true_labels, matches, gallery.class_names, top_k)
    report["map_at_r"] = map_at_r(queries, true_labels, gallery.embeddings, np.asarray(gallery.class_names)[gallery.labels])
    return report, matches


def evaluate(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5) -> dict:
    """Recognise every test image against the recogniser's gallery (no rejection) and score the answers."""
    folder = test if isinstance(test, ImageFolder) else scan_folder(test)
    return score_queries(recognizer.embed(folder.paths), folder.label_names, recognizer.gallery, top_k)[0]


def _untrained_embedding(config: Config):
    """The network as training starts it: same config and seed, weights as built."""
    import keras

    from .model import build_embedding_model

    keras.utils.set_random_seed(config.train.seed)
    return build_embedding_model(config.model)


def baseline_reports(config: Config, train: ImageFolder, test: ImageFolder, top_k: int,
                     heldout: ImageFolder | None = None, seed: int = 0) -> dict:
    """What training bought: the same scores for nearest neighbour on raw pixels and for the untrained network.

    Raw pixels are compared at the model's input size (at most ``RAW_PIXELS_MAX_SIZE``).
    With ``heldout``, each baseline also gets ``fewshot``: the same episodes (same seed) as the model's.
    """
    from .embed import decode_all, embed_images

    size = min(config.model.input_size, RAW_PIXELS_MAX_SIZE)
    batch = config.evaluate.embed_batch_size
    summary = ("top1", f"top{top_k}", "class_avg_accuracy", "map_at_r", "macro_precision")

    settings = config.evaluate

    def scores(embed) -> dict:
        gallery = Gallery(embed(train), train.labels, list(train.class_names), list(train.paths))
        report = score_queries(embed(test), test.label_names, gallery, top_k)[0]
        scored = {key: report[key] for key in summary}
        if heldout is not None:
            scored["fewshot"] = few_shot_report(embed(heldout), heldout.labels, settings.fewshot_way,
                                                settings.fewshot_shots, settings.fewshot_episodes, seed)[0]
        return scored

    def pixels(folder: ImageFolder) -> np.ndarray:
        return decode_all(folder.paths, size, batch).reshape(len(folder), -1).astype(np.float32)

    untrained = _untrained_embedding(config)
    return {
        "baseline_raw_pixels": {**scores(pixels), "size": size},
        "baseline_untrained": scores(lambda folder: embed_images(untrained, folder.paths, batch)),
    }


@dataclass
class Assessment:
    """A full evaluation: the JSON-ready report and the arrays its plots are drawn from."""

    report: dict
    test: ImageFolder
    queries: np.ndarray
    matches: list[Match]
    heldout: ImageFolder | None = None
    unknown_distances: np.ndarray | None = None
    ms_per_query: float = 0.0  # reading and embedding one test image, test-time views included (not a metric: it varies)

    @property
    def nearest_distances(self) -> np.ndarray:
        return np.array([m.distance for m in self.matches])

    @property
    def correct(self) -> np.ndarray:
        return np.array([m.label == t for m, t in zip(self.matches, self.test.label_names)])


def assess(
    recognizer,
    test: ImageFolder,
    train: ImageFolder | None = None,
    heldout: ImageFolder | None = None,
    seed: int = 0,
) -> Assessment:
    """Score a recogniser on a test folder, with the settings of its ``config.evaluate``.

    Args:
        recognizer: the :class:`~siamese_core.recognizer.SiameseRecognizer` to score (no rejection).
        test: labelled queries; every class should be in the gallery.
        train: the gallery's images; with ``evaluate.baselines`` the raw-pixel and untrained-network
            baselines are scored on them and ``test``.
        heldout: classes never trained on (none may be in the gallery): known against unknown
            classes, and few-shot episodes that enrol them k at a time.
        seed: the seed of the few-shot episodes and of the calibration folds.

    Returns:
        An :class:`Assessment` whose ``report`` holds the accuracy report and MAP@R;
        ``calibration`` (the unknown-class threshold, its figures cross-fitted: see
        :func:`~siamese_core.metrics.cross_fitted_calibration`); ``baseline_raw_pixels`` and
        ``baseline_untrained``; ``open_set`` and ``fewshot``; and ``notes`` on what was reduced
        or skipped. Raises DatasetError when a held-out class is in the gallery.
    """
    settings = recognizer.config.evaluate
    start = time.perf_counter()
    queries = recognizer.embed(test.paths)
    ms_per_query = (time.perf_counter() - start) * 1000 / max(1, len(test))
    report, matches = score_queries(queries, test.label_names, recognizer.gallery, settings.top_k)
    result = Assessment(report, test, queries, matches, ms_per_query=ms_per_query)
    notes: list[str] = []
    out_of_fold = None
    try:
        report["calibration"] = cross_fitted_calibration(result.nearest_distances, result.correct, test.labels,
                                                         settings.threshold_target, seed=seed)
        out_of_fold = report["calibration"].pop("out_of_fold_thresholds")
    except ValueError as exc:
        notes.append(f"no threshold: {exc}")
    if train is not None and settings.baselines:
        report.update(baseline_reports(recognizer.config, train, test, settings.top_k, heldout, seed))
    if heldout is not None:
        shared = sorted(set(heldout.class_names) & set(recognizer.gallery.class_names))
        if shared:
            raise DatasetError(f"{heldout.root}: held-out classes must be new, but {shared[:5]} are in the gallery")
        unknown = recognizer.embed(heldout.paths)
        result.heldout = heldout
        result.unknown_distances = np.array([m.distance for m in recognizer.gallery.search(unknown, 1)])
        if "calibration" in report:
            report["open_set"] = open_set_report(result.nearest_distances, result.correct, result.unknown_distances,
                                                 report["calibration"]["threshold"], out_of_fold)
        report["fewshot"], fewshot_notes = few_shot_report(  # enrolled and searched as the product does
            unknown, heldout.labels, settings.fewshot_way, settings.fewshot_shots, settings.fewshot_episodes, seed,
            classify=recognizer.classify_among)
        notes.extend(fewshot_notes)
    report["notes"] = notes
    return result


