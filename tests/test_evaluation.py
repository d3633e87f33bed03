"""Evaluation metrics on hand-computed cases, threshold calibration, rejection of unknown images, and `assess`."""

import math

import numpy as np
import pytest
from mlflow_fixtures import untrained_recognizer

from siamese_core.config import apply_overrides
from siamese_core.distance import squared_distances
from siamese_core.errors import BundleError, DatasetError
from siamese_core.evaluation import assess
from siamese_core.gallery import Match
from siamese_core.metrics import (
    accuracy_report,
    average_precision_at_r,
    calibrate_threshold,
    cross_fitted_calibration,
    few_shot_report,
    flat_metrics,
    map_at_r,
    open_set_report,
)
from siamese_core.recognizer import (
    UNKNOWN,
    SiameseRecognizer,
    store_threshold,
)


def test_average_precision_at_r_by_hand():
    labels = ["a", "b", "a", "b"]
    ap = average_precision_at_r([[0.1, 0.2, 0.3, 0.4],   # a first, then b: (1/2) * P(1) = 0.5
                                 [0.1, 0.1, 0.3, 0.4],   # tie between a and b: b is ranked first -> (1/2) * P(2)
                                 [0.4, 0.1, 0.3, 0.2]],  # both b before any a
                                ["a", "a", "a"], labels)
    np.testing.assert_allclose(ap, [0.5, 0.25, 0.0])
    # a class with one reference (R = 1), found first or not; a class with none (R = 0) is NaN
    single = average_precision_at_r([[0.5, 0.1, 0.2], [0.0, 0.1, 0.2], [0.1, 0.2, 0.3]], ["c", "c", "z"], ["c", "a", "a"])
    assert single[:2].tolist() == [0.0, 1.0] and math.isnan(single[2])


def test_map_at_r_on_embeddings_skips_queries_without_references():
    references, reference_labels = np.array([[0.1], [0.2], [9.9], [5.0]]), ["a", "b", "b", "a"]
    queries = np.array([[0.0], [10.0], [3.0]])
    # query a: a b a b -> 0.5; query b: b a b a -> 0.5; query z has no reference and is left out
    assert map_at_r(queries, ["a", "b", "z"], references, reference_labels, chunk=1) == pytest.approx(0.5)
    separated = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert map_at_r(separated, ["a", "a", "b", "b"], separated, ["a", "a", "b", "b"]) == 1.0
    assert math.isnan(map_at_r(queries[:1], ["z"], references, reference_labels))


def test_precision_and_recall_per_class():
    matches = [Match("a", 0.1, [("a", 0.1)]), Match("b", 0.1, [("b", 0.1)]), Match("b", 0.1, [("b", 0.1)]),
               Match("a", 0.1, [("a", 0.1)])]
    report = accuracy_report(["a", "a", "b", "c"], matches, ["a", "b", "c"], top_k=1)
    assert report["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.0} == report["per_class_accuracy"]
    assert report["per_class_precision"] == {"a": 0.5, "b": 0.5, "c": 0.0}  # c is never predicted
    assert report["macro_precision"] == pytest.approx(1 / 3)


def test_open_set_auroc_and_accuracy_with_rejection():
    report = open_set_report([0.1, 0.3], [True, False], [0.2, 0.5], threshold=0.25)
    # known nearer than unknown in 3 of the 4 (known, unknown) pairs
    assert report["auroc"] == pytest.approx(0.75)
    # right: the accepted correct known query and the rejected unknown one
    assert report["accuracy_with_rejection"] == 0.5
    assert (report["known_accepted"], report["unknown_rejected"]) == (0.5, 0.5)
    assert open_set_report([0.2], [True], [0.2], 0.1)["auroc"] == 0.5  # a tie counts half
    # known queries judged by their own (out-of-fold) thresholds: the 0.3 one is now accepted, and wrong
    per_query = open_set_report([0.1, 0.3], [True, False], [0.2, 0.5], threshold=0.25, known_thresholds=[0.2, 0.35])
    assert per_query["known_accepted"] == 1.0 and per_query["accuracy_with_rejection"] == 0.5


def test_cross_fitted_calibration_judges_each_query_by_a_threshold_not_fitted_on_it():
    # two classes, four queries each; class a's right answers are near, b's wrong ones far
    distances = np.array([0.1, 0.2, 0.3, 0.9, 0.15, 0.25, 0.8, 0.7])
    correct = np.array([True, True, True, False, True, True, False, False])
    labels = np.array(list("aaaabbbb"))
    result = cross_fitted_calibration(distances, correct, labels, "best_f1", folds=2, seed=3)
    thresholds = result["out_of_fold_thresholds"]
    assert result["threshold"] == calibrate_threshold(distances, correct)["threshold"] == 0.3
    for value in np.unique(thresholds):  # each fold's threshold is what the other fold alone gives
        judged = thresholds == value
        assert value == calibrate_threshold(distances[~judged], correct[~judged])["threshold"]
        assert sorted(labels[judged]) == list("aabb")  # stratified: two queries of each class per fold
    accepted = distances <= thresholds
    assert result["accept_rate"] == accepted.mean()
    assert result["recall"] == np.sum(accepted & correct) / correct.sum()
    assert result["method"].startswith("2-fold cross-fitting")
    # one correct answer cannot be cross-fitted: the figures are in-sample, and say so
    few = cross_fitted_calibration([0.1, 0.5], [True, False], ["a", "b"])
    assert few["method"].startswith("in-sample") and few["precision"] == 1.0 and few["accept_rate"] == 0.5


def test_threshold_calibration_on_constructed_distances():
    distances, correct = [0.5, 0.1, 0.4, 0.2, 0.3], [False, True, True, True, False]
    best = calibrate_threshold(distances, correct, "best_f1")
    assert best["threshold"] == 0.4 and best["precision"] == 0.75 and best["recall"] == 1.0
    assert best["f1"] == pytest.approx(6 / 7) and best["accept_rate"] == 0.8
    strict = calibrate_threshold(distances, correct, 0.9)
    assert strict["threshold"] == 0.2 and strict["recall"] == pytest.approx(2 / 3) and strict["target_met"]
    assert calibrate_threshold(distances, correct, 0.7)["threshold"] == 0.4

    # equal distances are accepted together: the tie at 0.1 is half right, not 100% precise
    tied = calibrate_threshold([0.1, 0.1, 0.2], [True, False, False], 1.0)
    assert tied["threshold"] == 0.1 and tied["precision"] == 0.5 and not tied["target_met"]
    with pytest.raises(ValueError, match="at least one correct"):
        calibrate_threshold([0.1], [False])


def test_few_shot_falls_back_to_fewer_ways_and_says_so():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 6)
    embeddings = rng.normal(size=(5, 4))[labels] * 50 + rng.normal(size=(30, 4))
    results, notes = few_shot_report(embeddings, labels, n_way=20, shots=[1, 5, 6], episodes=20)
    assert set(results) == {"1shot", "5shot"}
    assert results["1shot"]["n_way"] == results["5shot"]["n_way"] == 5 and results["5shot"]["mean"] == 1.0
    assert "5-way instead of 20-way" in notes[0] and "6-shot skipped" in notes[2]


def test_flat_metrics_keeps_numbers_and_drops_tables():
    report = {"top1": 0.5, "n_queries": 4, "per_class_accuracy": {"a": 1.0}, "confusion_matrix": {"labels": ["a"]},
              "baseline_untrained": {"top1": 0.25}, "calibration": {"threshold": 0.3, "target": "best_f1",
                                                                    "target_met": True},
              "fewshot": {"1shot": {"mean": 0.9, "n_way": 5}}, "notes": ["x"]}
    assert flat_metrics(report) == {"top1": 0.5, "n_queries": 4, "baseline_untrained.top1": 0.25,
                                    "calibration.threshold": 0.3, "fewshot.1shot.mean": 0.9, "fewshot.1shot.n_way": 5}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny untrained recogniser over 3 digit classes, its test folder and 2 held-out classes."""
    return untrained_recognizer(tmp_path_factory.mktemp("digits"), fewshot_episodes=20)


def test_reject_answers_unknown_beyond_the_threshold(untrained, tmp_path):
    recognizer, _, test, _ = untrained
    plain = recognizer.predict(test.paths)
    with pytest.raises(BundleError, match="calibrated threshold"):
        recognizer.predict(test.paths, reject=True)

    threshold = float(np.median([m.distance for m in plain]))
    recognizer.save(tmp_path / "bundle")
    store_threshold(tmp_path / "bundle", threshold, {"target": "best_f1"})
    loaded = SiameseRecognizer.load(tmp_path / "bundle")
    assert loaded.threshold == threshold and loaded.metadata["threshold_calibration"] == {"target": "best_f1"}
    rejected = loaded.predict(test.paths, reject=True)
    for before, after in zip(plain, rejected):
        assert after.label == (UNKNOWN if before.distance > threshold else before.label)
        assert after.distance == pytest.approx(before.distance, abs=1e-6) and len(after.top_k) == len(before.top_k)
    assert {m.label for m in rejected} >= {UNKNOWN} and len({m.label for m in rejected}) > 1
    assert [m.label for m in loaded.predict(test.paths)] == [m.label for m in plain]  # reject_unknown is off
    loaded.config = apply_overrides(loaded.config, {"reject_unknown": True})
    assert [m.label for m in loaded.predict(test.paths)] == [m.label for m in rejected]


def test_assess_scores_baselines_open_set_and_few_shot(untrained):
    recognizer, train, test, heldout = untrained
    result = assess(recognizer, test, train, heldout)
    report = result.report
    queries = recognizer.embed(test.paths)
    gallery = recognizer.gallery
    assert report["n_queries"] == len(test)
    assert report["map_at_r"] == pytest.approx(float(np.nanmean(average_precision_at_r(
        squared_distances(queries, gallery.embeddings), test.label_names,
        np.asarray(gallery.class_names)[gallery.labels]))))
    assert set(report["baseline_raw_pixels"]) >= {"top1", "top5", "map_at_r"}
    # the untrained baseline is this very network: the same figures
    assert report["baseline_untrained"]["top1"] == report["top1"]
    nearest = [m.distance for m in gallery.search(queries, 1)]
    correct = [m.label == t for m, t in zip(gallery.search(queries, 1), test.label_names)]
    assert report["calibration"]["threshold"] == calibrate_threshold(nearest, correct)["threshold"]
    assert report["open_set"]["n_unknown"] == len(heldout)
    assert report["fewshot"]["1shot"]["n_way"] == 2 and report["fewshot"]["5shot"]["n_way"] == 2
    assert any("2-way instead of 20-way" in note for note in report["notes"])
    assert len(result.unknown_distances) == len(heldout) and result.correct.shape == (len(test),)
    with pytest.raises(DatasetError, match="held-out classes must be new"):
        assess(recognizer, test, heldout=train)
