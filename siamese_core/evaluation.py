"""Evaluating a recogniser: embed the test (and held-out) images, score them with the figures
of ``siamese_core.metrics``, and run the two baselines (raw pixels, the untrained network)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import openset
from .config import Config
from .data import ImageFolder, scan_folder
from .errors import DatasetError
from .evaluation_report import (
    Baseline,
    BaselineCheck,
    BaselineComparison,
    Calibration,
    EvaluationReport,
    FewShot,
    Interval,
    OpenSet,
    QueryScores,
    RawPixelsBaseline,
    Verdict,
    summary,
)
from .gallery import Gallery, Match
from .metrics import (
    accuracy_report,
    average_precisions,
    bootstrap_interval,
    few_shot_report,
    mean_of_finite,
    validation_warning,
)

log = logging.getLogger(__name__)
# Raw-pixel baseline images are at most this side, so a 200 px model's baseline stays small in memory.
RAW_PIXELS_MAX_SIZE = 64
# The figures the baseline check compares (with their intervals), and the baselines by their report fields.
BASELINE_METRICS = {"top1": "top-1", "map_at_r": "MAP@R"}
BASELINE_NAMES = {"baseline_raw_pixels": "raw pixels", "baseline_untrained": "the untrained network"}


@dataclass(frozen=True)
class PerQuery:
    """Each test query's top-1 answer (right or not) and AP@R (NaN where its class has no gallery image):
    what the figures' intervals and the baseline check are drawn from."""

    correct: np.ndarray
    average_precision: np.ndarray

    def values(self, metric: str) -> np.ndarray:
        """The per-query values whose mean is ``metric`` (``top1`` or ``map_at_r``)."""
        return self.correct.astype(np.float64) if metric == "top1" else self.average_precision

    def figure(self, metric: str) -> float:
        return mean_of_finite(self.values(metric))

    def intervals(self, seed: int = 0) -> dict[str, Interval]:
        """``top1_ci95`` and ``map_at_r_ci95``: 95 % bootstrap intervals over the queries."""
        return {f"{metric}_ci95": _interval(bootstrap_interval(self.values(metric), seed=seed))
                for metric in BASELINE_METRICS}


def _interval(bounds: tuple[float, float]) -> Interval:
    return Interval(low=bounds[0], high=bounds[1])


def score_queries(queries: np.ndarray, true_labels: list[str], gallery: Gallery, top_k: int, seed: int = 0
                  ) -> tuple[QueryScores, list[Match], PerQuery]:
    """The accuracy report plus MAP@R of query embeddings against a gallery, with 95 % intervals of top-1 and
    MAP@R (a bootstrap over the queries, seeded), the matches and the per-query values."""
    matches = gallery.search(queries, top_k)
    report = accuracy_report(true_labels, matches, gallery.class_names, top_k)
    per_query = PerQuery(np.array([m.label == t for m, t in zip(matches, true_labels)], dtype=bool),
                         average_precisions(queries, true_labels, gallery.embeddings,
                                            np.asarray(gallery.class_names)[gallery.labels]))
    report["map_at_r"] = per_query.figure("map_at_r")
    return QueryScores.model_validate({**report, **per_query.intervals(seed)}), matches, per_query


def evaluate(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5, seed: int = 0) -> QueryScores:
    """Recognise every test image against the recogniser's gallery (no rejection) and score the answers."""
    return evaluate_queries(recognizer, test, top_k, seed)[0]


def evaluate_queries(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5, seed: int = 0
                     ) -> tuple[QueryScores, PerQuery]:
    """:func:`evaluate`, with the per-query values its intervals and the baseline check are drawn from."""
    folder = test if isinstance(test, ImageFolder) else scan_folder(test)
    scores, _, per_query = score_queries(recognizer.embed(folder.paths), folder.label_names, recognizer.gallery,
                                         top_k, seed)
    return scores, per_query


def baseline_reports(config: Config, train: ImageFolder, test: ImageFolder, top_k: int,
                     heldout: ImageFolder | None = None, seed: int = 0
                     ) -> tuple[dict[str, Baseline], dict[str, PerQuery]]:
    """What training bought: the same scores for nearest neighbour on raw pixels and for the untrained network,
    keyed by their report fields (``baseline_raw_pixels``, ``baseline_untrained``), and their per-query values
    (for :func:`baseline_check`).

    The untrained network answers as the trained one does (``config.evaluate``: its test-time views and its
    matching, in the test queries and in the few-shot episodes), so that the difference is training's alone.
    Raw pixels are plain nearest neighbour at the model's input size (at most ``RAW_PIXELS_MAX_SIZE``).
    With ``heldout``, each baseline also gets ``fewshot``: the same episodes (same seed) as the model's.
    """
    from .embed import decode_all  # lazy: TensorFlow loads when a network is scored, not when this module is imported
    from .model import initial_embedding_model
    from .recognizer import SiameseRecognizer, build_gallery

    size = min(config.model.input_size, RAW_PIXELS_MAX_SIZE)
    settings = config.evaluate

    def scores(queries: np.ndarray, gallery: Gallery, embed: Callable[[ImageFolder], np.ndarray],
               classify: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
               ) -> tuple[dict, PerQuery]:
        scored, _, per_query = score_queries(queries, test.label_names, gallery, top_k, seed)
        figures: dict = {**summary(scored), "top1_ci95": scored.top1_ci95, "map_at_r_ci95": scored.map_at_r_ci95}
        if heldout is not None:
            figures["fewshot"] = few_shot_report(embed(heldout), heldout.labels, settings.fewshot_way,
                                                 settings.fewshot_shots, settings.fewshot_episodes, seed,
                                                 classify=classify)[0]
        return figures, per_query

    def pixels(folder: ImageFolder) -> np.ndarray:
        return decode_all(folder.paths, size, settings.embed_batch_size).reshape(len(folder), -1).astype(np.float32)

    raw, raw_queries = scores(pixels(test), Gallery(pixels(train), train.labels, list(train.class_names),
                                                    list(train.paths)), pixels)
    network = initial_embedding_model(config)
    untrained = SiameseRecognizer(network, build_gallery(network, train, settings), config)
    plain, plain_queries = scores(untrained.embed(test.paths), untrained.gallery,
                                  lambda folder: untrained.embed(folder.paths), untrained.classify_among)
    return ({"baseline_raw_pixels": RawPixelsBaseline.model_validate({**raw, "size": size}),
             "baseline_untrained": Baseline.model_validate(plain)},
            {"baseline_raw_pixels": raw_queries, "baseline_untrained": plain_queries})


def _verdict(model: float, difference: tuple[float, float], margin: float) -> Verdict:
    """Beats when the whole interval of the difference is above ``margin`` (or the model is perfect), does not
    beat when it is wholly at or below it, and cannot tell when it straddles it."""
    low, high = difference
    if model >= 1.0 or low > margin:  # a perfect score is not beaten
        return "beats"
    return "does not beat" if high <= margin else "too few to tell"


def compare_with_baselines(model: PerQuery, baselines: dict[str, PerQuery], margin: float = 0.0,
                           confidence: float = 0.95, seed: int = 0) -> list[BaselineComparison]:
    """The model against each baseline on top-1 and MAP@R, on the same queries: the interval of the difference
    model - baseline at ``confidence`` (a paired bootstrap over the queries; 0: the point difference) and
    its verdict against ``margin``."""
    comparisons = []
    for name in BASELINE_NAMES:
        for metric in BASELINE_METRICS:
            ours, theirs = model.figure(metric), baselines[name].figure(metric)
            difference = ((ours - theirs, ours - theirs) if confidence == 0 else bootstrap_interval(
                model.values(metric) - baselines[name].values(metric), confidence, seed=seed))
            comparisons.append(BaselineComparison(
                baseline=name, metric=metric, model=ours, against=theirs, difference_low=difference[0],
                difference_high=difference[1], verdict=_verdict(ours, difference, margin)))
    return comparisons


def _shortfall(c: BaselineComparison, confidence: float) -> str:
    text = f"{BASELINE_METRICS[c.metric]} {c.model:.4f} against {BASELINE_NAMES[c.baseline]} {c.against:.4f}"
    return text + (f", difference {c.difference_low:+.4f} to {c.difference_high:+.4f}" if confidence else "")


def baseline_check(model: PerQuery, baselines: dict[str, PerQuery], margin: float = 0.0, confidence: float = 0.95,
                   seed: int = 0) -> BaselineCheck:
    """Whether the model beats both ``baselines`` (per-query values of :func:`baseline_reports`) by more than
    ``margin`` on top-1 and MAP@R, beyond the uncertainty of ``confidence`` (see :func:`compare_with_baselines`),
    with one plain sentence. A perfect figure (1.0) counts as not beaten.

    ``passed`` only when every comparison beats; when an interval straddles the margin (and none lies below
    it) the sentence says there are too few test images to tell. ``passed`` is False when a baseline is
    missing (``evaluate.baselines`` off): an unchecked model has not shown that training helped.
    """
    if any(name not in baselines for name in BASELINE_NAMES):
        return BaselineCheck(passed=False, margin=margin, confidence=confidence, sentence="The baselines were not "
                             "scored (evaluate.baselines is off), so nothing shows that training helped; it cannot "
                             "become champion.")
    comparisons = compare_with_baselines(model, baselines, margin, confidence, seed)
    verdicts = {c.verdict for c in comparisons}
    verdict: Verdict = ("does not beat" if "does not beat" in verdicts else "too few to tell" if "too few to tell"
                        in verdicts else "beats")
    n = len(model.correct)
    by = (f" by more than {margin:g}" if margin > 0 else f" (allowing {-margin:g} worse)" if margin < 0 else "")
    level = f"{100 * confidence:g} %"
    shortfalls = "; ".join(_shortfall(c, confidence) for c in comparisons if c.verdict != "beats")
    if verdict == "does not beat":
        sentence = (f"The trained model does not beat its baselines{by} on its own test split ({shortfalls}): "
                    "training did not help on this data, so it cannot become champion.")
    elif verdict == "too few to tell":
        sentence = (f"The trained model cannot be told apart from its baselines{by} on its own test split, too few "
                    f"test images to tell ({n} queries): {shortfalls} ({level} intervals of the difference). "
                    "It cannot become champion until more test images show it; a lower "
                    "evaluate.baseline_confidence asks for less certainty.")
    else:
        def best(metric: str) -> str:
            ours = [c for c in comparisons if c.metric == metric]
            text = f"{BASELINE_METRICS[metric]} {ours[0].model:.4f} against at best {max(c.against for c in ours):.4f}"
            if not confidence:
                return text
            return text + (" (perfect)" if ours[0].model >= 1.0
                           else f" (difference at least {min(c.difference_low for c in ours):+.4f})")

        beyond = f", beyond the {level} interval of each difference over {n} queries" if confidence else ""
        sentence = (f"The trained model beats both baselines{by} on its own test split{beyond}: "
                    + ", ".join(best(metric) for metric in BASELINE_METRICS) + ".")
    return BaselineCheck(passed=verdict == "beats", margin=margin, sentence=sentence, confidence=confidence,
                         n_queries=n, verdict=verdict, comparisons=comparisons)


def check_baselines(recognizer, train: ImageFolder, test: ImageFolder) -> BaselineCheck:
    """:func:`baseline_check` of a recogniser on ``test`` against its gallery images ``train`` (no calibration,
    no held-out classes): what ``siamese train`` reports after training."""
    config = recognizer.config
    settings, seed = config.evaluate, config.train.seed
    per_query = evaluate_queries(recognizer, test, settings.top_k, seed)[1]
    baselines = baseline_reports(config, train, test, settings.top_k, seed=seed)[1]
    return baseline_check(per_query, baselines, settings.baseline_margin, settings.baseline_confidence, seed)


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
    scores, matches, per_query = score_queries(queries, test.label_names, recognizer.gallery, settings.top_k, seed)
    notes: list[str] = []
    log.info("evaluate: calibrating the unknown-class threshold on classes left out of the gallery")
    calibration, rounds = _calibrate_open_set(recognizer, queries, test, unknowns, seed, notes)
    if train is not None and settings.baselines:
        log.info("evaluate: scoring the baselines (raw pixels, the untrained network) on %d gallery images", len(train))
    baselines, baseline_queries = (baseline_reports(recognizer.config, train, test, settings.top_k, heldout, seed)
                                   if train is not None and settings.baselines else ({}, {}))
    check = baseline_check(per_query, baseline_queries, settings.baseline_margin, settings.baseline_confidence, seed)
    report = EvaluationReport(**dict(scores), calibration=calibration, **baselines, baseline_check=check, notes=notes)
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
    with the seed it was trained with and, with ``evaluate.baselines``, the baselines on its own gallery's images;
    the report's ``validation_warning`` is read from the training history in the bundle's metadata."""
    gallery_images = recognizer.gallery.image_folder() if recognizer.config.evaluate.baselines else None
    result = assess(recognizer, test, gallery_images, heldout, seed=recognizer.config.train.seed, unknowns=unknowns)
    result.report.validation_warning = validation_warning(recognizer.metadata.get("history") or {})
    return result
