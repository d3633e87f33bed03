"""Closed-set evaluation of a recogniser on a test folder."""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import confusion_matrix

from .data import ImageFolder, scan_folder
from .gallery import Match


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
