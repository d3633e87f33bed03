"""Accuracy report and few-shot episodes on hand-built cases."""

import numpy as np
import pytest

from siamese_core.gallery import Match
from siamese_core.metrics import accuracy_report, few_shot_accuracy


def test_accuracy_report_counts_top1_top_k_and_per_class():
    matches = [
        Match("a", 0.1, [("a", 0.1), ("b", 0.2)]),
        Match("b", 0.1, [("b", 0.1), ("a", 0.3)]),  # wrong at top-1, right at top-2
        Match("b", 0.1, [("b", 0.1), ("a", 0.3)]),
    ]
    report = accuracy_report(["a", "a", "b"], matches, ["a", "b"], top_k=2)
    assert report["top1"] == pytest.approx(2 / 3) and report["top2"] == 1.0
    assert report["per_class_accuracy"] == {"a": 0.5, "b": 1.0}
    assert report["class_avg_accuracy"] == 0.75
    assert report["confusion_matrix"] == {"labels": ["a", "b"], "matrix": [[1, 1], [0, 1]]}


def test_few_shot_is_perfect_on_separated_clusters_and_chance_on_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 4)
    clustered = rng.normal(size=(30, 8))[labels] * 100 + rng.normal(size=(120, 8))
    result = few_shot_accuracy(clustered, labels, n_way=20, episodes=50)
    assert result["mean"] == 1.0 and result["ci95"] == 0.0
    noise = few_shot_accuracy(rng.normal(size=(120, 8)), labels, n_way=20, episodes=400)
    assert abs(noise["mean"] - 1 / 20) < 3 * noise["ci95"] + 0.01
    with pytest.raises(ValueError, match="needs 40 classes"):
        few_shot_accuracy(clustered, labels, n_way=40)
