"""Closed-set evaluation of a recogniser on a test folder."""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import confusion_matrix

from .data import ImageFolder, scan_folder
from .gallery import Match, squared_distances


def accuracy_report(true_labels: list[str], matches: list[Match], class_names: list[str], top_k: int = 5) -> dict:
    """Top-1, top-k, class-averaged and per-class accuracy, and the confusion matrix.

    ``class_names`` fixes the row/column order of the confusion matrix; a true
    label missing from the gallery can never be predicted and counts as wrong.
    """
    predicted = [m.label for m in matches]
    hits = np.array([t == p for t, p in zip(true_labels, predicted)], dtype=bool)
    hits_k = np.array([t in [label for label, _ in m.top_k[:top_k]] for t, m in zip(true_labels, matches)], dtype=bool)
    names = list(dict.fromkeys([*class_names, *true_labels]))
    per_class = {name: float(hits[[t == name for t in true_labels]].mean()) for name in dict.fromkeys(true_labels)}
    return {
        "top1": float(hits.mean()) if len(hits) else 0.0,
        f"top{top_k}": float(hits_k.mean()) if len(hits_k) else 0.0,
        "class_avg_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "n_queries": len(true_labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": {
            "labels": names,
            "matrix": confusion_matrix(true_labels, predicted, labels=names).tolist(),
        },
    }


def evaluate(recognizer, test: str | os.PathLike | ImageFolder, top_k: int = 5) -> dict:
    """Recognise every test image against the recogniser's gallery and score the answers."""
    folder = test if isinstance(test, ImageFolder) else scan_folder(test)
    matches = recognizer.predict(folder.paths, top_k=top_k)
    return accuracy_report(folder.label_names, matches, recognizer.gallery.class_names, top_k)


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
