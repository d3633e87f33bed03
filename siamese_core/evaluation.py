"""Evaluating a recogniser: embed the test (and held-out) images, score them with the figures
of ``siamese_core.metrics``, and run the two baselines (raw pixels, the untrained network)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from . import openset
from .config import Config
from .data import ImageFolder, scan_folder
from .errors import DatasetError
from .evaluation_report import (
    Baseline,
    BaselineCheck,
    Calibration,
    EvaluationReport,
    FewShot,
    OpenSet,
    QueryScores,
    RawPixelsBaseline,
    summary,
)
from .gallery import Gallery, Match
from .metrics import accuracy_report, few_shot_report, map_at_r

log = logging.getLogger(__name__)
# Raw-pixel baseline images are at most this side, so a 200 px model's baseline stays small in memory.
RAW_PIXELS_MAX_SIZE = 64


def score_queries(queries: np.ndarray, true_labels: list[str], gallery: Gallery, top_k: int
                  ) -> tuple[QueryScores, list[Match]]:
    """The accuracy report plus MAP@R of query embeddings against a gallery, and the matches."""
    matches = gallery.search(queries, top_k)
    report = accuracy_report(true_labels, matches, gallery.class_names, top_k)
    report["map_at_r"] = map_at_r(queries, true_labels, gallery.embeddings, np.asarray(gallery.class_names)[gallery.labels])
    return QueryScores.model_validate(report), matches


def evaluate(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5) -> QueryScores:
    """Recognise every test image against the recogniser's gallery (no rejection) and score the answers."""
    folder = test if isinstance(test, ImageFolder) else scan_folder(test)
    return score_queries(recognizer.embed(folder.paths), folder.label_names, recognizer.gallery, top_k)[0]


def baseline_reports(config: Config, train: ImageFolder, test: ImageFolder, top_k: int,
                     heldout: ImageFolder | None = None, seed: int = 0) -> dict[str, Baseline]:
    """What training bought: the same scores for nearest neighbour on raw pixels and for the untrained network,
    keyed by their report fields (``baseline_raw_pixels``, ``baseline_untrained``).

    Raw pixels are compared at the model's input size (at most ``RAW_PIXELS_MAX_SIZE``).
    With ``heldout``, each baseline also gets ``fewshot``: the same episodes (same seed) as the model's.
    """
    from .embed import decode_all, embed_images
    from .model import initial_embedding_model

    size = min(config.model.input_size, RAW_PIXELS_MAX_SIZE)
    batch = config.evaluate.embed_batch_size
    settings = config.evaluate

    def scores(embed) -> dict:
        gallery = Gallery(embed(train), train.labels, list(train.class_names), list(train.paths))
        scored: dict = summary(score_queries(embed(test), test.label_names, gallery, top_k)[0])
        if heldout is not None:
            scored["fewshot"] = few_shot_report(embed(heldout), heldout.labels, settings.fewshot_way,
                                                settings.fewshot_shots, settings.fewshot_episodes, seed)[0]
        return scored

    def pixels(folder: ImageFolder) -> np.ndarray:
        return decode_all(folder.paths, size, batch).reshape(len(folder), -1).astype(np.float32)

    untrained = initial_embedding_model(config)
    return {
        "baseline_raw_pixels": RawPixelsBaseline.model_validate({**scores(pixels), "size": size}),
        "baseline_untrained": Baseline.model_validate(scores(lambda folder: embed_images(untrained, folder.paths, batch))),
    }


BASELINE_METRICS = {"top1": "top-1", "map_at_r": "MAP@R"}
BASELINE_NAMES = {"baseline_raw_pixels": "raw pixels", "baseline_untrained": "the untrained network"}


def baseline_check(scores: QueryScores, baselines: dict[str, Baseline], margin: float = 0.0) -> BaselineCheck:
    """Whether the model's ``scores`` beat both ``baselines`` (:func:`baseline_reports`) by more than ``margin``
    on top-1 and MAP@R (or are perfect on one), with one plain sentence.

    ``passed`` is False when a baseline is missing (``evaluate.baselines`` off): an unchecked model
    has not shown that training helped.
    """
    if any(name not in baselines for name in BASELINE_NAMES):
        return BaselineCheck(passed=False, margin=margin, sentence="The baselines were not scored "
                             "(evaluate.baselines is off), so nothing shows that training helped; it cannot become champion.")
    model = {key: getattr(scores, key) for key in BASELINE_METRICS}
    figures = {name: {key: getattr(baselines[name], key) for key in BASELINE_METRICS} for name in BASELINE_NAMES}
    shortfalls = [f"{label} {model[key]:.4f} against {BASELINE_NAMES[name]} {figures[name][key]:.4f}"
                  for key, label in BASELINE_METRICS.items() for name in BASELINE_NAMES
                  if not (model[key] > figures[name][key] + margin or model[key] >= 1.0)]  # perfect is not beaten
    by = (f" by more than {margin:g}" if margin > 0 else f" (allowing {-margin:g} worse)" if margin < 0 else "")
    if shortfalls:
        sentence = (f"The trained model does not beat its baselines{by} on its own test split ({'; '.join(shortfalls)}): "
                    "training did not help on this data, so it cannot become champion.")
    else:
        best = {key: max(figures[name][key] for name in BASELINE_NAMES) for key in BASELINE_METRICS}
        sentence = (f"The trained model beats both baselines{by} on its own test split: " + ", ".join(
            f"{label} {model[key]:.4f} against at best {best[key]:.4f}" for key, label in BASELINE_METRICS.items()) + ".")
    return BaselineCheck(passed=not shortfalls, margin=margin, sentence=sentence)


def check_baselines(recognizer, train: ImageFolder, test: ImageFolder) -> BaselineCheck:
    """:func:`baseline_check` of a recogniser on ``test`` against its gallery images ``train`` (no calibration,
    no held-out classes): what ``siamese train`` reports after training."""
    settings = recognizer.config.evaluate
    return baseline_check(evaluate(recognizer, test, settings.top_k),
                          baseline_reports(recognizer.config, train, test, settings.top_k), settings.baseline_margin)


@dataclass
class Assessment:
    """A full evaluation: the report and the arrays its plots are drawn from."""

    report: EvaluationReport
    test: ImageFolder
    queries: np.ndarray
    matches: list[Match]
    heldout: ImageFolder | None = None
    unknown_distances: np.ndarray | None = None
    known_scores: np.ndarray | None = None  # unknown scores of known and unknown queries, for the ROC curve
    unknown_scores: np.ndarray | None = None
    ms_per_query: float = 0.0  # reading and embedding one test image, test-time views included (not a metric: it varies)

    @property
    def nearest_distances(self) -> np.ndarray:
        return np.array([m.distance for m in self.matches])

    @property
    def correct(self) -> np.ndarray:
        return np.array([m.label == t for m, t in zip(self.matches, self.test.label_names)])


def _calibrate_open_set(recognizer, queries: np.ndarray, test: ImageFolder, unknowns: ImageFolder | None, seed: int,
                        notes: list[str]) -> tuple[Calibration | None, list[openset.Round]]:
    """Simulate unknowns by leaving folds of gallery classes out, and calibrate the threshold on them."""
    settings = recognizer.config.evaluate
    o = settings.open_set
    extra = recognizer.embed(unknowns.paths) if unknowns is not None else None
    try:
        rounds = openset.simulate_unknowns(
            recognizer.gallery, queries, test.label_names,
            lambda gallery, queries: recognizer.searched(gallery).search(queries, max(2, settings.top_k)),
            o.folds, seed, extra)
        calibration = openset.calibrate(rounds, o.score, o.fit_to, o.known_accept, o.unknown_reject)
    except ValueError as exc:
        notes.append(f"no threshold: {exc}")
        return None, []
    return Calibration.model_validate(calibration), rounds


def _heldout_open_set(recognizer, result: Assessment, unknown: np.ndarray, unknown_matches: list[Match],
                      calibration: Calibration) -> OpenSet:
    """The held-out classes against the known test queries, judged by the calibrated score and threshold."""
    kind, gallery = calibration.score, recognizer.gallery
    known_matches = result.matches if recognizer.config.evaluate.top_k >= 2 else gallery.search(result.queries, 2)
    known = openset.unknown_scores(kind, gallery, result.queries, known_matches)
    unknown_scores = openset.unknown_scores(kind, gallery, unknown, unknown_matches)
    result.known_scores, result.unknown_scores = known, unknown_scores
    return OpenSet(
        score=kind,
        auroc=openset.auroc(known, unknown_scores),
        auroc_nearest_distance=openset.auroc(result.nearest_distances, np.array([m.distance for m in unknown_matches])),
        **openset.rates(known, result.correct, unknown_scores, calibration.threshold),
        n_known=len(known),
        n_unknown=len(unknown_scores),
    )


def _judge_target_on_heldout(calibration: Calibration, heldout: OpenSet) -> None:
    """Judge the calibration's target on the held-out classes, which the threshold never saw: unknowns of
    another kind than the gallery's own classes, the closer estimate of what a served model meets."""
    other, target = openset.checked_rate(calibration.fit_to, calibration.known_accept_target,
                                         calibration.unknown_reject_target)
    rate = getattr(heldout, other)
    calibration.target_met = bool(rate >= target)
    calibration.target_judged_on = f"held-out classes ({other} {rate:.4f})"


def assess(
    recognizer,
    test: ImageFolder,
    train: ImageFolder | None = None,
    heldout: ImageFolder | None = None,
    seed: int = 0,
    unknowns: ImageFolder | None = None,
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
        unknowns: images of no gallery class (a user's ``unknown/`` folder), unknowns in every calibration round.

    Returns:
        An :class:`Assessment` whose ``report`` (an :class:`EvaluationReport`) holds the accuracy report and MAP@R;
        ``calibration`` (the unknown score and threshold at the operating point of ``evaluate.open_set``,
        calibrated on classes left out of the gallery, its rates cross-fitted: see
        :func:`~siamese_core.openset.calibrate`); ``baseline_raw_pixels`` and ``baseline_untrained``;
        ``open_set`` (the held-out classes judged by that threshold) and ``fewshot``; and ``notes`` on
        what was reduced or skipped. Raises DatasetError when a held-out class is in the gallery.
    """
    settings = recognizer.config.evaluate
    log.info("evaluate: embedding %d test images", len(test))
    start = time.perf_counter()
    queries = recognizer.embed(test.paths)
    ms_per_query = (time.perf_counter() - start) * 1000 / max(1, len(test))
    scores, matches = score_queries(queries, test.label_names, recognizer.gallery, settings.top_k)
    notes: list[str] = []
    log.info("evaluate: calibrating the unknown-class threshold on classes left out of the gallery")
    calibration, rounds = _calibrate_open_set(recognizer, queries, test, unknowns, seed, notes)
    if train is not None and settings.baselines:
        log.info("evaluate: scoring the baselines (raw pixels, the untrained network) on %d gallery images", len(train))
    baselines = (baseline_reports(recognizer.config, train, test, settings.top_k, heldout, seed)
                 if train is not None and settings.baselines else {})
    report = EvaluationReport(**dict(scores), calibration=calibration, **baselines,
                              baseline_check=baseline_check(scores, baselines, settings.baseline_margin), notes=notes)
    result = Assessment(report, test, queries, matches, ms_per_query=ms_per_query)
    if rounds and calibration is not None:  # the ROC of the simulated unknowns, unless real held-out classes replace it
        result.known_scores = np.concatenate([r.known[calibration.score] for r in rounds])
        result.unknown_scores = np.concatenate([r.unknown[calibration.score] for r in rounds])
    if heldout is not None:
        shared = sorted(set(heldout.class_names) & set(recognizer.gallery.class_names))
        if shared:
            raise DatasetError(f"{heldout.root}: held-out classes must be new, but {shared[:5]} are in the gallery")
        log.info("evaluate: %d held-out images: unknown-class scores and %d few-shot episodes per shot count",
                 len(heldout), settings.fewshot_episodes)
        unknown = recognizer.embed(heldout.paths)
        result.heldout = heldout
        unknown_matches = recognizer.gallery.search(unknown, 2)
        result.unknown_distances = np.array([m.distance for m in unknown_matches])
        if report.calibration is not None:
            report.open_set = _heldout_open_set(recognizer, result, unknown, unknown_matches, report.calibration)
            _judge_target_on_heldout(report.calibration, report.open_set)
        fewshot, fewshot_notes = few_shot_report(  # enrolled and searched as the product does
            unknown, heldout.labels, settings.fewshot_way, settings.fewshot_shots, settings.fewshot_episodes, seed,
            classify=recognizer.classify_among)
        report.fewshot = {shots: FewShot.model_validate(episodes) for shots, episodes in fewshot.items()}
        report.notes.extend(fewshot_notes)
    return result


def assess_bundle(recognizer, test: ImageFolder, heldout: ImageFolder | None = None,
                  unknowns: ImageFolder | None = None) -> Assessment:
    """Score a bundle as the pipeline's evaluate stage and ``siamese evaluate`` both do: :func:`assess`
    with the seed it was trained with and, with ``evaluate.baselines``, the baselines on its own gallery's images."""
    gallery_images = recognizer.gallery.image_folder() if recognizer.config.evaluate.baselines else None
    return assess(recognizer, test, gallery_images, heldout, seed=recognizer.config.train.seed, unknowns=unknowns)
