"""The evaluation report as typed models: what :mod:`siamese_core.evaluation` returns, the pipeline writes
as artifacts/evaluation.json and every renderer reads by attribute.

``to_dict()`` gives the JSON's dict, key for key in the same order, sections that were not scored left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: fields in order, absent (None) sections left out."""
        return self.model_dump(exclude_none=True)


class TopKScores(_Model):
    """Top-1 and top-k accuracy. The JSON names top-k by its k (``"top5"``); with k = 1 it is ``top1`` alone."""

    top1: float
    top_k: int = Field(exclude=True)
    top_k_accuracy: float

    @property
    def top_k_name(self) -> str:
        return f"top{self.top_k}"

    @model_validator(mode="before")
    @classmethod
    def _read_top_k(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "top_k" in data:
            return data
        k = next((int(key[3:]) for key in data if key.startswith("top") and key[3:].isdigit() and key != "top1"), 1)
        data = dict(data)
        accuracy = data["top1"] if k == 1 else data.pop(f"top{k}")
        return {**data, "top_k": k, "top_k_accuracy": accuracy}

    @model_serializer(mode="wrap")
    def _write_top_k(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {(self.top_k_name if key == "top_k_accuracy" else key): value for key, value in handler(self).items()
                if key != "top_k_accuracy" or self.top_k != 1}


class Interval(_Model):
    """A 95 % interval: a percentile bootstrap over the test queries (:func:`~siamese_core.metrics.bootstrap_interval`).
    Flat in metrics.json as ``<figure>_ci95.low`` and ``<figure>_ci95.high``."""

    low: float
    high: float


class ConfusionMatrix(_Model):
    labels: list[str]
    matrix: list[list[int]]


class QueryScores(TopKScores):
    """Test queries against a gallery (:func:`~siamese_core.evaluation.score_queries`): accuracy, precision,
    recall, the confusion matrix and MAP@R."""

    class_avg_accuracy: float
    macro_precision: float
    n_queries: int
    per_class_accuracy: dict[str, float]
    per_class_precision: dict[str, float]
    per_class_recall: dict[str, float]
    confusion_matrix: ConfusionMatrix
    map_at_r: float
    top1_ci95: Interval | None = None
    map_at_r_ci95: Interval | None = None


class FewShot(_Model):
    """N-way k-shot accuracy over episodes: the mean and its 95% half-width."""

    mean: float
    ci95: float
    episodes: int
    n_way: int
    k_shot: int


class Baseline(TopKScores):
    """A baseline's figures on the same gallery and queries, and its few-shot results (``"1shot"``: ...)."""

    class_avg_accuracy: float
    map_at_r: float
    macro_precision: float
    top1_ci95: Interval | None = None
    map_at_r_ci95: Interval | None = None
    fewshot: dict[str, FewShot] | None = None


class RawPixelsBaseline(Baseline):
    """Nearest neighbour on raw pixels, compared at ``size`` px."""

    size: int


Verdict = Literal["beats", "too few to tell", "does not beat"]


class BaselineComparison(_Model):
    """The model against one baseline on one figure, on the same queries: both figures, the interval of their
    difference (model - baseline, a paired bootstrap at the check's confidence; the point difference at
    confidence 0) and the verdict against the margin."""

    baseline: str
    metric: str
    model: float
    against: float
    difference_low: float
    difference_high: float
    verdict: Verdict


class BaselineCheck(_Model):
    """Whether the model beats both baselines by more than ``margin`` on top-1 and MAP@R, in one sentence.

    ``verdict``: ``beats`` (``passed``), ``too few to tell`` (an interval of a difference straddles the margin and
    none lies below it) or ``does not beat``; None when the baselines were not scored. ``confidence`` 0 is the
    plain comparison of the figures; ``comparisons`` the four comparisons (two baselines by two figures).
    """

    passed: bool
    margin: float
    sentence: str
    confidence: float = 0.0
    n_queries: int | None = None
    verdict: Verdict | None = None
    comparisons: list[BaselineComparison] | None = None


class OperatingPoint(_Model):
    known_accept_target: float
    threshold: float
    known_accepted: float
    unknown_rejected: float
    accuracy_with_rejection: float


class Calibration(_Model):
    """The unknown score and threshold at the operating point, with cross-fitted rates
    (:func:`~siamese_core.openset.calibrate`)."""

    score: str
    threshold: float
    fit_to: str
    known_accept_target: float
    unknown_reject_target: float
    target_met: bool
    target_judged_on: str
    known_accepted: float
    unknown_rejected: float
    accuracy_with_rejection: float
    auroc: float
    auroc_by_score: dict[str, float]
    operating_points: list[OperatingPoint]
    rounds: int
    method: str


class OpenSet(_Model):
    """Known test queries against held-out classes, judged by the calibrated score and threshold."""

    score: str
    auroc: float
    auroc_nearest_distance: float
    known_accepted: float
    unknown_rejected: float
    accuracy_with_rejection: float
    n_known: int
    n_unknown: int


class EvaluationReport(QueryScores):
    """A full evaluation (:func:`~siamese_core.evaluation.assess`): the query scores, the calibration, the
    baselines and their check, the held-out classes (open set and few-shot), the training history's
    ``validation_warning`` (:func:`~siamese_core.metrics.validation_warning`; None when it gave none or was not
    read) and notes on what was skipped."""

    calibration: Calibration | None = None
    baseline_raw_pixels: RawPixelsBaseline | None = None
    baseline_untrained: Baseline | None = None
    baseline_check: BaselineCheck
    open_set: OpenSet | None = None
    fewshot: dict[str, FewShot] | None = None
    validation_warning: str | None = None
    notes: list[str]

    @classmethod
    def read(cls, path: str | os.PathLike) -> EvaluationReport:
        """The report of an evaluation.json."""
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


def summary(scores: QueryScores | Baseline) -> dict[str, float]:
    """Top-1, top-k (named by k), class-averaged accuracy, MAP@R and macro precision, in that order."""
    return {"top1": scores.top1, scores.top_k_name: scores.top_k_accuracy,
            "class_avg_accuracy": scores.class_avg_accuracy, "map_at_r": scores.map_at_r,
            "macro_precision": scores.macro_precision}
