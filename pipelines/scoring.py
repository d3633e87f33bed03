"""Scoring the champion for the gate: the champion and a new version on the queries both serve (TensorFlow runs here).

Called by the register stage before the gate's lock is taken (:func:`pipelines.registry.apply_gate`), so no other
registration waits while a gallery is embedded.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from mlflow.entities.model_registry import ModelVersion

from siamese_core.data import ImageFolder, scan_folder
from siamese_core.evaluation import evaluate
from siamese_core.recognizer import SiameseRecognizer

from .gate import Scores
from .registry import bundle_copy

ChampionScorer = Callable[[ModelVersion], "Scores | None"]


def same_queries_scorer(bundle_dir: str | os.PathLike, train_dir: str | os.PathLike, test_dir: str | os.PathLike,
                        metric: str) -> ChampionScorer:
    """Score a champion version as the new version in ``bundle_dir`` was scored: each network embeds this run's
    gallery images (``train_dir``) and test queries (``test_dir``), searched with its own settings.

    Where the two serve the same classes, only the champion is scored (the new version's figure is its evaluation's).
    Where they share some classes (a version retrained on feedback with new classes, or one that dropped some), both
    are scored on the images of the shared classes only. None when they share no class: another data set.
    """

    def score(champion: ModelVersion) -> Scores | None:
        gallery, queries = scan_folder(train_dir), scan_folder(test_dir)
        with bundle_copy(f"models:/{champion.name}/{champion.version}") as bundle:
            recognizer = SiameseRecognizer.load(bundle)
            served, classes = set(recognizer.gallery.class_names), set(gallery.class_names)
            shared = served & classes
            if not shared:
                return None
            if shared == served == classes:
                return Scores(_figure(recognizer, gallery, queries, metric))
            gallery, queries = only(gallery, shared), only(queries, shared)
            theirs = _figure(recognizer, gallery, queries, metric)
        mine = _figure(SiameseRecognizer.load(bundle_dir), gallery, queries, metric)
        return Scores(theirs, mine, tuple(sorted(classes - served)), tuple(sorted(served - shared)))

    return score


def _figure(recognizer: SiameseRecognizer, gallery: ImageFolder, queries: ImageFolder, metric: str) -> float:
    return float(evaluate(recognizer.with_gallery(gallery), queries, recognizer.config.evaluate.top_k).to_dict()[metric])


def only(folder: ImageFolder, classes: set[str]) -> ImageFolder:
    """The images of ``folder`` of the classes ``classes``."""
    names = sorted(classes & set(folder.class_names))
    keep = [i for i, label in enumerate(folder.label_names) if label in classes]
    return ImageFolder(folder.root, [folder.paths[i] for i in keep],
                       np.array([names.index(folder.label_names[i]) for i in keep], dtype=folder.labels.dtype), names)
