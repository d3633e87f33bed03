"""Evaluation of a recogniser: accuracy, retrieval quality, baselines, unknown classes and few-shot episodes.

Every figure is computed from plain arrays by a function that can be checked by hand;
:func:`assess` runs them all on a test folder (and optionally held-out classes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .config import Config
from .data import ImageFolder, scan_folder
from .errors import DatasetError
from .gallery import Gallery, Match, squared_distances

# Raw-pixel baseline images are at most this side, so a 200 px model's baseline stays small in memory.
RAW_PIXELS_MAX_SIZE = 64
# Sections of a report that are tables, not figures: left out of the flat metrics.
_TABLES = ("per_class_accuracy", "per_class_precision", "per_class_recall", "confusion_matrix")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def accuracy_report(true_labels: list[str], matches: list[Match], class_names: list[str], top_k: int = 5) -> dict:
    """Top-1, top-k, class-averaged and per-class accuracy, precision and recall, and the confusion matrix.

    ``class_names`` fixes the row/column order of the confusion matrix; a true
    label missing from the gallery can never be predicted and counts as wrong.
    Per-class recall is per-class accuracy; precision of a class is the share of
    queries predicted as that class that belong to it (0 when none is). Both are
    listed for the classes of the test set; ``macro_precision`` averages them.
    """
    predicted = [m.label for m in matches]
    hits = np.array([t == p for t, p in zip(true_labels, predicted)], dtype=bool)
    hits_k = np.array([t in [label for label, _ in m.top_k[:top_k]] for t, m in zip(true_labels, matches)], dtype=bool)
    names = list(dict.fromkeys([*class_names, *true_labels]))
    present = list(dict.fromkeys(true_labels))
    per_class = {name: float(hits[[t == name for t in true_labels]].mean()) for name in present}
    precision, recall = [], []
    if present:
        precision, recall = precision_recall_fscore_support(true_labels, predicted, labels=present, zero_division=0)[:2]
    return {
        "top1": float(hits.mean()) if len(hits) else 0.0,
        f"top{top_k}": float(hits_k.mean()) if len(hits_k) else 0.0,
        "class_avg_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "macro_precision": float(np.mean(precision)) if present else 0.0,
        "n_queries": len(true_labels),
        "per_class_accuracy": per_class,
        "per_class_precision": {name: float(p) for name, p in zip(present, precision)},
        "per_class_recall": {name: float(r) for name, r in zip(present, recall)},
        "confusion_matrix": {
            "labels": names,
            "matrix": confusion_matrix(true_labels, predicted, labels=names).tolist(),
        },
    }


def average_precision_at_r(distances: np.ndarray, query_labels, reference_labels) -> np.ndarray:
    """AP@R of every query (one row of ``distances`` to the references); NaN where R is 0.

    R is the number of references of the query's class. The references are ranked by
    distance and the first R kept: ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)``, with
    ``rel(i)`` 1 when the i-th reference is of the query's class and ``P(i)`` the
    precision of the first i. Equal distances are ranked against the query (other
    classes first), so ties never raise the score.
    """
    distances = np.asarray(distances, dtype=np.float64)
    relevant = np.asarray(query_labels)[:, None] == np.asarray(reference_labels)[None, :]
    r = relevant.sum(axis=1)
    ranked = np.take_along_axis(relevant, np.lexsort((relevant, distances), axis=-1), axis=1)
    position = np.arange(1, distances.shape[1] + 1)
    precision = np.cumsum(ranked, axis=1) / position
    within = position[None, :] <= r[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, (precision * ranked * within).sum(axis=1) / r, np.nan)


def map_at_r(queries: np.ndarray, query_labels, references: np.ndarray, reference_labels, chunk: int = 256) -> float:
    """Mean average precision at R of query embeddings against reference embeddings (squared distances).

    MAP@R (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020) is the
    mean of :func:`average_precision_at_r` over queries whose class has references (NaN if none).
    Unlike top-1 accuracy it rewards ranking *all* R same-class references first, not just one.
    """
    query_labels = np.asarray(query_labels)
    scores = np.concatenate([
        average_precision_at_r(squared_distances(queries[i : i + chunk], references), query_labels[i : i + chunk],
                               reference_labels)
        for i in range(0, len(queries), chunk)
    ]) if len(queries) else np.array([])
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def _score(queries: np.ndarray, true_labels: list[str], gallery: Gallery, top_k: int) -> tuple[dict, list[Match]]:
    """The accuracy report plus MAP@R of query embeddings against a gallery, and the matches."""
    matches = gallery.search(queries, top_k)
    report = accuracy_report(true_labels, matches, gallery.class_names, top_k)
    report["map_at_r"] = map_at_r(queries, true_labels, gallery.embeddings, np.asarray(gallery.class_names)[gallery.labels])
    return report, matches


def evaluate(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5) -> dict:
    """Recognise every test image against the recogniser's gallery (no rejection) and score the answers."""
    folder = test if isinstance(test, ImageFolder) else scan_folder(test)
    return _score(recognizer.embed(folder.paths), folder.label_names, recognizer.gallery, top_k)[0]


def calibrate_threshold(distances, correct, target: str | float = "best_f1") -> dict:
    """The squared-distance threshold up to which answers are accepted (``distance <= threshold``).

    ``distances`` are the nearest-gallery distances of labelled queries and ``correct``
    whether each answer was right; "accept when correct" is the positive class.
    ``target`` "best_f1" maximises F1 (the smallest such threshold); a float is a
    precision to reach with the most recall (if no threshold reaches it, the one with
    the best precision is taken and ``target_met`` is false).
    """
    distances, correct = np.asarray(distances, dtype=np.float64), np.asarray(correct, dtype=bool)
    if not correct.any():
        raise ValueError("threshold calibration needs at least one correct answer")
    order = np.argsort(distances, kind="stable")
    distances, correct = distances[order], correct[order]
    last = np.r_[distances[1:] != distances[:-1], True]  # a threshold accepts a whole group of equal distances
    accepted = np.arange(1, len(distances) + 1)[last]
    true_accepts = np.cumsum(correct)[last]
    precision, recall = true_accepts / accepted, true_accepts / correct.sum()
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall > 0)
    if target == "best_f1":
        best, met = int(np.argmax(f1)), True
    else:
        reached = np.flatnonzero(precision >= float(target))
        met = len(reached) > 0
        best = int(reached[-1]) if met else int(np.argmax(precision))
    return {
        "threshold": float(distances[last][best]),
        "target": target,
        "target_met": met,
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "f1": float(f1[best]),
        "accept_rate": float(accepted[best] / len(distances)),
    }


def cross_fitted_calibration(distances, correct, labels, target: str | float = "best_f1", folds: int = 2,
                             seed: int = 0) -> dict:
    """The threshold calibrated on all queries, with figures measured on queries it was not fitted on.

    The queries are split into ``folds`` parts, stratified by class (``labels``). Each part
    is judged with the threshold :func:`calibrate_threshold` fits on the other parts;
    ``precision``, ``recall``, ``f1`` and ``accept_rate`` pool those out-of-fold decisions,
    and ``out_of_fold_thresholds`` holds each query's threshold, for :func:`open_set_report`.
    ``threshold`` (the one a bundle stores) is fitted on all queries. When some part's
    complement has no correct answer to calibrate on, the figures are measured in-sample and
    ``method`` says so. Raises ValueError when no answer at all is correct.
    """
    distances, correct = np.asarray(distances, dtype=np.float64), np.asarray(correct, dtype=bool)
    labels = np.asarray(labels)
    fold = np.empty(len(distances), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):  # each class's queries dealt round the folds, from a random start
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    fitted = calibrate_threshold(distances, correct, target)
    thresholds = np.empty(len(distances))
    method = (f"{folds}-fold cross-fitting on the test queries, stratified by class: each query is judged by a "
              "threshold fitted on the other folds; the stored threshold is fitted on all of them")
    try:
        for part in range(folds):
            held = fold == part
            if held.any():
                thresholds[held] = calibrate_threshold(distances[~held], correct[~held], target)["threshold"]
    except ValueError:
        thresholds[:] = fitted["threshold"]
        method = ("in-sample, optimistic: fitted and measured on the same test queries, too few of which are "
                  "answered correctly to cross-fit")
    accepted = distances <= thresholds
    true_accepts = np.sum(accepted & correct)
    precision = true_accepts / accepted.sum() if accepted.any() else 0.0
    recall = true_accepts / correct.sum()
    return {
        "threshold": fitted["threshold"],
        "target": target,
        "target_met": fitted["target_met"],
        "method": method,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
        "accept_rate": float(accepted.mean()),
        "out_of_fold_thresholds": thresholds,
    }


def open_set_report(known_distances, known_correct, unknown_distances, threshold: float,
                    known_thresholds=None) -> dict:
    """Known against unknown classes, with the nearest distance as the score.

    ``auroc``: the chance that a random known query is nearer its match than a random
    unknown one (ties count half). ``accuracy_with_rejection``: known queries answered
    correctly and accepted, plus unknown queries rejected, over all queries. Unknown queries
    are judged by ``threshold``; known ones by ``known_thresholds`` (one per query, e.g.
    out-of-fold thresholds that were not fitted on them) when given, else by ``threshold``.
    """
    known, unknown = np.asarray(known_distances, float), np.asarray(unknown_distances, float)
    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    accepted_known = known <= (threshold if known_thresholds is None else np.asarray(known_thresholds, float))
    rejected_unknown = unknown > threshold
    right = np.sum(accepted_known & np.asarray(known_correct, bool)) + np.sum(rejected_unknown)
    return {
        "auroc": float(roc_auc_score(truth, -np.r_[known, unknown])),
        "accuracy_with_rejection": float(right / (len(known) + len(unknown))),
        "known_accepted": float(accepted_known.mean()),
        "unknown_rejected": float(rejected_unknown.mean()),
        "n_known": len(known),
        "n_unknown": len(unknown),
    }


def few_shot_accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_way: int = 20,
    k_shot: int = 1,
    episodes: int = 500,
    queries_per_class: int = 1,
    seed: int = 0,
) -> dict:
    """N-way k-shot accuracy over random episodes, from embeddings computed once.

    Each episode draws ``n_way`` classes, ``k_shot`` gallery images and
    ``queries_per_class`` other images per class; a query is right when its
    nearest gallery image is of its class. Returns the mean and a 95% interval
    (normal approximation over episodes).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = [c for c, idx in members.items() if len(idx) >= k_shot + queries_per_class]
    if len(eligible) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} classes with "
                         f"{k_shot + queries_per_class} images, found {len(eligible)}")
    scores = np.empty(episodes)
    for episode in range(episodes):
        classes = rng.choice(eligible, size=n_way, replace=False)
        picks = [rng.choice(members[c], size=k_shot + queries_per_class, replace=False) for c in classes]
        support = np.concatenate([p[:k_shot] for p in picks])
        query = np.concatenate([p[k_shot:] for p in picks])
        nearest = squared_distances(embeddings[query], embeddings[support]).argmin(axis=1)
        scores[episode] = np.mean(nearest // k_shot == np.repeat(np.arange(n_way), queries_per_class))
    half_width = 1.96 * scores.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else 0.0
    return {"mean": float(scores.mean()), "ci95": float(half_width), "episodes": episodes, "n_way": n_way, "k_shot": k_shot}


def few_shot_report(embeddings, labels, n_way: int, shots: list[int], episodes: int, seed: int = 0) -> tuple[dict, list[str]]:
    """:func:`few_shot_accuracy` for each k in ``shots`` as ``{"<k>shot": ...}``, and notes.

    When fewer than ``n_way`` classes have k + 1 images, the episodes use as many
    ways as there are such classes, and a note says so; under 2 classes, k is skipped.
    """
    labels = np.asarray(labels)
    sizes = np.unique(labels, return_counts=True)[1]
    results, notes = {}, []
    for k in shots:
        eligible = int(np.sum(sizes >= k + 1))
        if eligible < 2:
            notes.append(f"{k}-shot skipped: {eligible} held-out classes have the {k + 1} images it needs")
            continue
        if eligible < n_way:
            notes.append(f"{k}-shot: {eligible}-way instead of {n_way}-way, only {eligible} held-out classes "
                         f"have {k + 1} or more images")
        results[f"{k}shot"] = few_shot_accuracy(embeddings, labels, min(n_way, eligible), k, episodes, seed=seed)
    return results, notes


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
        report = _score(embed(test), test.label_names, gallery, top_k)[0]
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

    The report holds the accuracy report and MAP@R; the unknown-class threshold
    (``calibration``, its figures cross-fitted so that no query is judged by a threshold
    fitted on it: :func:`cross_fitted_calibration`); with ``train`` and ``evaluate.baselines``, the two
    baselines; with ``heldout`` (classes never trained on), ``open_set`` (known vs
    unknown) and ``fewshot`` (the held-out classes enrolled k at a time). ``notes``
    lists what was reduced or skipped.
    """
    settings = recognizer.config.evaluate
    queries = recognizer.embed(test.paths)
    report, matches = _score(queries, test.label_names, recognizer.gallery, settings.top_k)
    result = Assessment(report, test, queries, matches)
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
        report["fewshot"], fewshot_notes = few_shot_report(
            unknown, heldout.labels, settings.fewshot_way, settings.fewshot_shots, settings.fewshot_episodes, seed)
        notes.extend(fewshot_notes)
    report["notes"] = notes
    return result


def flat_metrics(report: dict) -> dict[str, float]:
    """The numbers of a report as one level of dotted keys (``baseline_untrained.top1``); tables left out."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if key in _TABLES:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in flat_metrics(value).items()})
        elif _is_number(value):
            flat[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
    return flat
