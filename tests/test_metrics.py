"""Accuracy report, few-shot episodes, proportion intervals and the validation-loss warning on hand-built cases."""

import numpy as np
import pytest
from scipy.stats import binomtest

from siamese_core.gallery import Match
from siamese_core.metrics import (
    accuracy_report,
    few_shot_accuracy,
    proportion_half_width,
    validation_warning,
    wilson_interval,
)


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


def test_validation_warning_names_the_epoch_of_the_minimum():
    """The photo run of the issue: validation loss fell to 0.168 at epoch 3, then rose to 0.374 by epoch 18."""
    rising = [0.25, 0.2, 0.168, *np.linspace(0.18, 0.374, 15).tolist()]
    warning = validation_warning({"loss": [1.0] * 18, "val_loss": rising})
    assert warning.startswith("Validation loss rose over most of training: lowest 0.168 at epoch 3 of 18, 0.374 at "
                              "the last.") and "train.epochs" in warning
    assert validation_warning({"val_loss": [0.2, 0.17, 0.2, 0.26, 0.3, 0.37]}) is not None  # minimum at 2 of 6
    falling = validation_warning({"val_loss": [0.4, 0.3, 0.25, 0.2, 0.19, 0.2]})
    late = validation_warning({"val_loss": [0.4, 0.3, 0.2, 0.1, 0.3, 0.4]})  # minimum at epoch 4 of 6: second half
    small = validation_warning({"val_loss": [0.2, 0.17, 0.2, 0.22, 0.24, 0.25]})  # under 1.5 times the minimum
    assert falling is late is small is None
    assert validation_warning({"val_loss": [0.1, 0.3, 0.5]}) is None  # too few epochs to say
    assert validation_warning({"loss": [0.1, 0.3, 0.5, 0.7]}) is None  # no validation batches
    assert validation_warning({"val_loss": [0.1, float("nan"), 0.5, 0.7]}) is None


@pytest.mark.parametrize(("right", "trials"), [(20, 20), (0, 10), (7, 9), (200, 400), (1, 3)])
def test_a_proportion_gets_the_wilson_interval(right, trials):
    """Checked against SciPy's Wilson interval; 20 right of 20 is not certainty (the normal approximation says +-0)."""
    interval = binomtest(right, trials).proportion_ci(0.95, method="wilson")
    proportion = right / trials
    expected = max(proportion - interval.low, interval.high - proportion)
    assert proportion_half_width(proportion, trials) == pytest.approx(expected, rel=1e-9)
    assert proportion_half_width(proportion, trials) > 0.02
    assert wilson_interval(proportion, trials) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)  # no trial: anything
