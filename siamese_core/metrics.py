"""The figures of an evaluation, each computed from plain arrays by a function that can be checked by hand:
accuracy, retrieval quality (MAP@R), few-shot episodes, bootstrap intervals over queries, the training history's
validation-loss warning, and the flat form of a report. Nothing here builds or runs a model;
``siamese_core.evaluation`` does, and calls these.

Intervals are percentile bootstrap intervals (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13): the test queries are resampled with replacement; a difference between two models on the same queries
resamples the per-query differences, so both are drawn on the same queries (a paired bootstrap). A proportion
from few trials gets a Wilson score interval (Wilson, JASA 1927), which, unlike the normal approximation, does not
shrink to nothing at 0 or 1: 20 right of 20 is not certainty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from statistics import NormalDist

import numpy as np

from .distance import squared_distances
from .evaluation_report import QueryScores

# Sections of a report that are tables, not figures: left out of the flat metrics.
TABLES = ("per_class_accuracy", "per_class_precision", "per_class_recall", "confusion_matrix")
BOOTSTRAP_RESAMPLES = 1000
# Validation loss that ends this many times above its minimum, reached in the first half of training, is flagged.
VALIDATION_RISE = 1.5


def is_number(value) -> bool:
    """A real number, NumPy's included, and not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def accuracy_report(true_labels: list[str], matches: list, class_names: list[str], top_k: int = 5) -> dict:
    """Top-1, top-k, class-averaged and per-class accuracy, precision and recall, and the confusion matrix.

    ``class_names`` fixes the row/column order of the confusion matrix; a true
    label missing from the gallery can never be predicted and counts as wrong.
    Per-class recall is per-class accuracy; precision of a class is the share of
    queries predicted as that class that belong to it (0 when none is). Both are
    listed for the classes of the test set; ``macro_precision`` averages them. ``matches``
    are :class:`~siamese_core.gallery.Match` answers.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

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


def average_precisions(queries: np.ndarray, query_labels, references: np.ndarray, reference_labels,
                       chunk: int = 256) -> np.ndarray:
    """:func:`average_precision_at_r` of query embeddings against reference embeddings (squared distances),
    ``chunk`` queries at a time."""
    query_labels = np.asarray(query_labels)
    return np.concatenate([
        average_precision_at_r(squared_distances(queries[i : i + chunk], references), query_labels[i : i + chunk],
                               reference_labels)
        for i in range(0, len(queries), chunk)
    ]) if len(queries) else np.array([])


def mean_of_finite(values: np.ndarray) -> float:
    """The mean of the finite values (NaN if none): MAP@R from per-query AP@R."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def map_at_r(queries: np.ndarray, query_labels, references: np.ndarray, reference_labels, chunk: int = 256) -> float:
    """Mean average precision at R of query embeddings against reference embeddings (squared distances).

    MAP@R (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020) is the
    mean of :func:`average_precision_at_r` over queries whose class has references (NaN if none).
    Unlike top-1 accuracy it rewards ranking *all* R same-class references first, not just one.
    """
    return mean_of_finite(average_precisions(queries, query_labels, references, reference_labels, chunk))


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (one per query; NaN ones left out).

    ``resamples`` means of as many values drawn with replacement (seeded); the interval runs from their
    (1 - confidence) / 2 quantile to their (1 + confidence) / 2 quantile. (NaN, NaN) without a finite value.
    For a paired comparison pass the per-query differences of two models on the same queries.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    block = max(1, 2**22 // len(values))  # resamples drawn at once: a few million indices in memory
    means = np.concatenate([values[rng.integers(0, len(values), (min(block, resamples - start), len(values)))].mean(axis=1)
                            for start in range(0, resamples, block)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def wilson_interval(proportion: float, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``proportion`` of ``trials`` independent trials; (0, 1) without a trial."""
    if trials < 1:
        return 0.0, 1.0
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    shrink = 1 + z * z / trials
    centre = (proportion + z * z / (2 * trials)) / shrink
    spread = z / shrink * np.sqrt(proportion * (1 - proportion) / trials + z * z / (4 * trials * trials))
    return float(centre - spread), float(centre + spread)


def proportion_half_width(proportion: float, trials: int, confidence: float = 0.95) -> float:
    """The larger distance from ``proportion`` to the ends of its :func:`wilson_interval`."""
    low, high = wilson_interval(proportion, trials, confidence)
    return max(proportion - low, high - proportion)


def validation_warning(history: dict[str, list[float]]) -> str | None:
    """A sentence when validation loss rose over most of training, else None.

    Flagged when its minimum came in the first half of the epochs and the last epoch's value is more than
    ``VALIDATION_RISE`` times that minimum (at least 4 finite epochs of ``val_loss`` in ``history``).
    """
    values = [float(v) for v in history.get("val_loss", [])]
    if len(values) < 4 or not np.isfinite(values).all():
        return None
    best = int(np.argmin(values))
    lowest, last = values[best], values[-1]
    if best + 1 > len(values) // 2 or last <= VALIDATION_RISE * lowest:
        return None
    return (f"Validation loss rose over most of training: lowest {lowest:.4g} at epoch {best + 1} of {len(values)}, "
            f"{last:.4g} at the last. The network may be fitting its training images rather than their classes: "
            "fewer epochs (train.epochs), more augmentation or more training images may do better.")


def few_shot_accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_way: int = 20,
    k_shot: int = 1,
    episodes: int = 500,
    queries_per_class: int = 1,
    seed: int = 0,
    classify: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """N-way k-shot accuracy over random episodes, from embeddings computed once.

    Each episode draws ``n_way`` classes, ``k_shot`` gallery images and
    ``queries_per_class`` other images per class; a query is right when
    ``classify(gallery embeddings, their labels, query embeddings)`` gives its class
    (by default: the class of its nearest gallery image). Returns the mean and a
    95% interval (normal approximation over episodes).
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
        if classify is None:
            found = labels[support][squared_distances(embeddings[query], embeddings[support]).argmin(axis=1)]
        else:
            found = classify(embeddings[support], labels[support], embeddings[query])
        scores[episode] = np.mean(found == labels[query])
    half_width = 1.96 * scores.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else 0.0
    return {"mean": float(scores.mean()), "ci95": float(half_width), "episodes": episodes, "n_way": n_way, "k_shot": k_shot}


def few_shot_report(embeddings, labels, n_way: int, shots: list[int], episodes: int, seed: int = 0,
                    classify: Callable | None = None) -> tuple[dict, list[str]]:
    """:func:`few_shot_accuracy` (with ``classify``) for each k in ``shots`` as ``{"<k>shot": ...}``, and notes.

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
        results[f"{k}shot"] = few_shot_accuracy(embeddings, labels, min(n_way, eligible), k, episodes, seed=seed,
                                                classify=classify)
    return results, notes


def flatten(data: dict, skip: Iterable[str] = (), prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (``{"model": {"margin": 0.5}} -> {"model.margin": 0.5}``),
    leaving out the keys in ``skip`` at any level."""
    flat: dict = {}
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, skip, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_metrics(report: QueryScores) -> dict[str, float]:
    """The numbers of a report (an :class:`~siamese_core.evaluation_report.EvaluationReport`, or the scores of
    :func:`~siamese_core.evaluation.evaluate`) as one level of dotted keys (``baseline_untrained.top1``);
    tables left out."""
    return {key: float(value) if isinstance(value, (float, np.floating)) else int(value)
            for key, value in flatten(report.to_dict(), TABLES).items() if is_number(value)}
