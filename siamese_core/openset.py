"""Answering "unknown": scores that separate unknown classes from known ones, and a threshold calibrated
on simulated unknowns at an operating point the user states.

Every query has a nearest gallery class, so an image of a class the gallery does not hold gets
one too. The recogniser answers ``unknown`` when the query's *unknown score* is above a threshold.
The scores (higher: more likely unknown), all from the query's distances to the gallery:

- ``nearest``: the squared distance to the nearest class (its nearest image, or its mean with
  ``match: class_mean``);
- ``ratio``: that distance over the distance to the second-nearest class (Lowe's ratio test);
- ``class_mean``: the distance to the nearest class mean;
- ``class_scaled``: the nearest distance over the predicted class's own scale, the median distance
  of its gallery images to their nearest same-class neighbour (a per-class threshold; classes with
  fewer than three images take the median scale of all classes).

Calibration needs no extra data: the gallery's classes are dealt into folds, and each fold in turn
is left out of the gallery, so the test queries of its classes become unknowns while the others stay
known (Scheirer et al., "Toward Open Set Recognition", 2013, for the protocol of held-out classes).
The threshold accepts the stated share of known queries (or rejects the stated share of unknowns)
over all rounds; the reported rates are cross-fitted: each round is judged by a threshold fitted on
the other rounds, so no class is judged unknown by a threshold fitted on it as an unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .distance import squared_distances
from .gallery import Gallery, Match

SCORES = ("nearest", "ratio", "class_mean", "class_scaled")
MIN_SCALE_IMAGES = 3


def class_scales(gallery: Gallery) -> np.ndarray:
    """Each class's typical spread: the median squared distance of its images to their nearest other image
    of the class; classes with fewer than ``MIN_SCALE_IMAGES`` images get the median over the others."""
    scales = np.full(len(gallery.class_names), np.nan)
    for label in range(len(gallery.class_names)):
        rows = np.asarray(gallery.embeddings[gallery.labels == label])
        if len(rows) >= MIN_SCALE_IMAGES:
            within = squared_distances(rows, rows)
            np.fill_diagonal(within, np.inf)
            scales[label] = np.median(within.min(axis=1))
    fallback = np.nanmedian(scales) if np.isfinite(scales).any() else 1.0
    return np.maximum(np.where(np.isfinite(scales), scales, fallback), 1e-12)


def unknown_scores(kind: str, gallery: Gallery, queries: np.ndarray, matches: list[Match],
                   scales: np.ndarray | None = None) -> np.ndarray:
    """The ``kind`` unknown score (one of ``SCORES``) of each query embedding, given its gallery matches.

    ``ratio`` reads the second class from the matches' top-k (a gallery of one class gives 1);
    ``class_scaled`` takes ``scales`` (:func:`class_scales`) when given, else computes them.
    """
    nearest = np.array([m.distance for m in matches], dtype=np.float64)
    if kind == "nearest":
        return nearest
    if kind == "ratio":
        second = np.array([m.top_k[1][1] if len(m.top_k) > 1 else m.distance for m in matches], dtype=np.float64)
        return np.divide(nearest, second, out=np.ones_like(nearest), where=second > 0)
    if kind == "class_mean":
        return squared_distances(np.asarray(queries, np.float32), gallery.means()).min(axis=1).astype(np.float64)
    if kind == "class_scaled":
        scales = class_scales(gallery) if scales is None else scales
        index = {name: i for i, name in enumerate(gallery.class_names)}
        return nearest / scales[[index[m.label] for m in matches]]
    raise ValueError(f"unknown score '{kind}', expected one of {SCORES}")


@dataclass
class Round:
    """One simulation round: the scores of every kind for its known and unknown queries, and whether
    each known query's answer was right."""

    known: dict[str, np.ndarray]
    unknown: dict[str, np.ndarray]
    correct: np.ndarray


def simulate_unknowns(gallery: Gallery, queries: np.ndarray, query_labels: list[str],
                      search: Callable[[Gallery, np.ndarray], list[Match]], folds: int = 5, seed: int = 0,
                      extra_unknowns: np.ndarray | None = None) -> list[Round]:
    """Leave each fold of the gallery's classes out in turn; the queries of its classes (and
    ``extra_unknowns``, embeddings of a user's unknown images, in every round) become unknowns.

    ``search(gallery, queries)`` searches a reduced gallery as the recogniser would. Needs at least
    two classes; with fewer classes than ``folds``, each class is its own fold.
    """
    names = np.asarray(gallery.class_names)
    if len(names) < 2:
        raise ValueError("calibrating on simulated unknowns needs a gallery of at least two classes")
    folds = min(folds, len(names))
    fold_of = np.empty(len(names), dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(len(names))] = np.arange(len(names)) % folds
    labels = np.asarray(query_labels)
    rounds = []
    for fold in range(folds):
        kept = np.flatnonzero(fold_of != fold)
        rows = np.isin(gallery.labels, kept)
        relabel = np.full(len(names), -1)
        relabel[kept] = np.arange(len(kept))
        reduced = Gallery(gallery.embeddings[rows], relabel[gallery.labels[rows]], list(names[kept]),
                          [p for p, keep in zip(gallery.paths, rows) if keep], class_means=gallery.class_means)
        known_rows = np.isin(labels, names[kept])
        unknown = queries[~known_rows & np.isin(labels, names)]
        if extra_unknowns is not None and len(extra_unknowns):
            unknown = np.concatenate([unknown, extra_unknowns])
        known_matches, unknown_matches = search(reduced, queries[known_rows]), search(reduced, unknown)
        scales = class_scales(reduced)
        rounds.append(Round(
            {kind: unknown_scores(kind, reduced, queries[known_rows], known_matches, scales) for kind in SCORES},
            {kind: unknown_scores(kind, reduced, unknown, unknown_matches, scales) for kind in SCORES},
            np.array([m.label == t for m, t in zip(known_matches, labels[known_rows])]),
        ))
    return rounds


def fit_threshold(known: np.ndarray, unknown: np.ndarray, fit_to: str, rate: float) -> float:
    """The score threshold (accept when ``score <= threshold``) that accepts at least ``rate`` of the known
    scores (``fit_to="known_accept"``) or rejects at least ``rate`` of the unknown ones (``"unknown_reject"``)."""
    if fit_to == "known_accept":
        ordered = np.sort(known)
        return float(ordered[min(len(ordered) - 1, max(0, int(np.ceil(rate * len(ordered))) - 1))])
    ordered = np.sort(unknown)
    rejected = int(np.ceil(rate * len(ordered)))  # the highest `rejected` scores are above the threshold
    if rejected >= len(ordered):
        return float(np.nextafter(ordered[0], -np.inf))
    return float(np.nextafter(ordered[len(ordered) - rejected], -np.inf))


def rates(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray, threshold) -> dict:
    """Known accepted, unknown rejected and accuracy with rejection (right accepted answers plus rejected
    unknowns, over all queries) at ``threshold`` (a number, or one per query as two arrays)."""
    known_threshold, unknown_threshold = threshold if isinstance(threshold, tuple) else (threshold, threshold)
    accepted = known <= known_threshold
    rejected = unknown > unknown_threshold
    total = len(known) + len(unknown)
    return {
        "known_accepted": float(accepted.mean()) if len(known) else float("nan"),
        "unknown_rejected": float(rejected.mean()) if len(unknown) else float("nan"),
        "accuracy_with_rejection": float((np.sum(accepted & correct) + rejected.sum()) / total) if total else float("nan"),
    }


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """The chance that a random known query scores below a random unknown one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    if not len(known) or not len(unknown):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(known)), np.zeros(len(unknown))], -np.r_[known, unknown]))


def _pooled(rounds: list[Round], kind: str, skip: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kept = [r for i, r in enumerate(rounds) if i != skip]
    return (np.concatenate([r.known[kind] for r in kept]), np.concatenate([r.correct for r in kept]),
            np.concatenate([r.unknown[kind] for r in kept]))


def checked_rate(fit_to: str, known_accept: float, unknown_reject: float) -> tuple[str, float]:
    """The rate the threshold is not fitted to, and its target: the check of the operating point."""
    return ("unknown_rejected", unknown_reject) if fit_to == "known_accept" else ("known_accepted", known_accept)


def rejection_on(setting: bool | str, calibration: dict) -> bool:
    """Whether unknowns are rejected: ``setting`` (``reject_unknown``), where "auto" is on when ``calibration``
    (a bundle's stored one) met its target."""
    return bool(calibration.get("target_met")) if setting == "auto" else bool(setting)


def _cross_fitted(rounds: list[Round], kind: str, fit_to: str, rate: float) -> tuple[float, dict]:
    """The threshold fitted on all rounds, and the rates of each round judged by a threshold fitted on the others."""
    threshold = fit_threshold(*_pooled(rounds, kind)[::2], fit_to, rate)
    known_thresholds, unknown_thresholds = [], []
    for i, held in enumerate(rounds):
        fitted = fit_threshold(*_pooled(rounds, kind, skip=i)[::2], fit_to, rate) if len(rounds) > 1 else threshold
        known_thresholds.append(np.full(len(held.known[kind]), fitted))
        unknown_thresholds.append(np.full(len(held.unknown[kind]), fitted))
    known, correct, unknown = _pooled(rounds, kind)
    return threshold, rates(known, correct, unknown, (np.concatenate(known_thresholds), np.concatenate(unknown_thresholds)))


OPERATING_POINTS = (0.8, 0.9, 0.95, 0.99)  # known-accept rates listed in the report's operating-point table


def calibrate(rounds: list[Round], score: str = "auto", fit_to: str = "known_accept", known_accept: float = 0.9,
              unknown_reject: float = 0.8) -> dict:
    """The threshold at the operating point, fitted on all simulation rounds, with cross-fitted rates.

    ``score="auto"`` takes the score with the highest pooled AUROC. The threshold reaches ``known_accept``
    (or ``unknown_reject``, with ``fit_to="unknown_reject"``) over all rounds; ``target_met`` says whether
    the other rate, cross-fitted, reaches its target too, which is when rejection is worth turning on.
    ``operating_points`` lists the threshold and cross-fitted rates at other known-accept rates.
    """
    if not all(len(r.known[SCORES[0]]) for r in rounds) or not any(len(r.unknown[SCORES[0]]) for r in rounds):
        raise ValueError("simulated unknowns gave a round without known queries, or no unknown query at all")
    aurocs = {kind: auroc(*_pooled(rounds, kind)[::2]) for kind in SCORES}
    chosen = max(SCORES, key=lambda kind: aurocs[kind]) if score == "auto" else score
    rate = known_accept if fit_to == "known_accept" else unknown_reject
    threshold, crossed = _cross_fitted(rounds, chosen, fit_to, rate)
    other, target = checked_rate(fit_to, known_accept, unknown_reject)
    table = []
    for point in OPERATING_POINTS:
        point_threshold, point_rates = _cross_fitted(rounds, chosen, "known_accept", point)
        table.append({"known_accept_target": point, "threshold": point_threshold, **point_rates})
    return {
        "score": chosen,
        "threshold": threshold,
        "fit_to": fit_to,
        "known_accept_target": known_accept,
        "unknown_reject_target": unknown_reject,
        "target_met": bool(crossed[other] >= target),
        "target_judged_on": f"classes left out of the gallery, cross-fitted ({other} {crossed[other]:.4f})",
        **crossed,
        "auroc": aurocs[chosen],
        "auroc_by_score": aurocs,
        "operating_points": table,
        "rounds": len(rounds),
        "method": f"{len(rounds)} rounds, each leaving a fold of the gallery's classes out (their test queries become "
                  "unknowns); rates cross-fitted: each round judged by a threshold fitted on the other rounds",
    }


def roc_points(known: np.ndarray, unknown: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve of known against unknown queries: known accepted and unknown accepted at each threshold."""
    from sklearn.metrics import roc_curve

    false_accept, known_accepted, _ = roc_curve(np.r_[np.ones(len(known)), np.zeros(len(unknown))],
                                                -np.r_[known, unknown])
    return {"unknown_accepted": false_accept.tolist(), "known_accepted": known_accepted.tolist()}
