"""Evaluation metrics on hand-computed cases, threshold calibration, rejection of unknown images, and `assess`."""

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.files import write_json
from siamese_core import openset
from siamese_core.distance import squared_distances
from siamese_core.errors import BundleError, DatasetError
from siamese_core.evaluation import assess, baseline_check
from siamese_core.evaluation_report import Baseline, EvaluationReport, QueryScores
from siamese_core.gallery import Gallery, Match
from siamese_core.metrics import (
    accuracy_report,
    average_precision_at_r,
    few_shot_report,
    flat_metrics,
    map_at_r,
)
from siamese_core.recognizer import (
    UNKNOWN,
    SiameseRecognizer,
    store_threshold,
)

from support.models import untrained_recognizer


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


def test_open_set_rates_and_auroc_by_hand():
    known, correct, unknown = np.array([0.1, 0.3]), np.array([True, False]), np.array([0.2, 0.5])
    # known scored lower than unknown in 3 of the 4 (known, unknown) pairs
    assert openset.auroc(known, unknown) == pytest.approx(0.75)
    assert openset.auroc(np.array([0.2]), np.array([0.2])) == 0.5  # a tie counts half
    # right: the accepted correct known query and the rejected unknown one
    assert openset.rates(known, correct, unknown, 0.25) == {
        "known_accepted": 0.5, "unknown_rejected": 0.5, "accuracy_with_rejection": 0.5}
    # per-query thresholds: the 0.3 known query is now accepted, and wrong
    per_query = openset.rates(known, correct, unknown, (np.array([0.2, 0.35]), np.array([0.25, 0.25])))
    assert per_query["known_accepted"] == 1.0 and per_query["accuracy_with_rejection"] == 0.5


def test_fit_threshold_reaches_the_stated_rate_and_no_more():
    known, unknown = np.array([0.5, 0.1, 0.4, 0.2, 0.3]), np.array([0.35, 0.9, 0.6, 0.8])
    for rate in (0.2, 0.6, 0.8, 0.9, 1.0):
        t = openset.fit_threshold(known, unknown, "known_accept", rate)
        assert np.mean(known <= t) >= rate and t in known  # the smallest known score that reaches it
        lower = known[known < t]
        assert not len(lower) or np.mean(known <= lower.max()) < rate
        u = openset.fit_threshold(known, unknown, "unknown_reject", rate)
        assert np.mean(unknown > u) >= rate
        assert np.mean(unknown > np.nextafter(u, np.inf)) < rate or u >= unknown.max()  # the largest such threshold
    assert openset.fit_threshold(known, unknown, "known_accept", 0.6) == 0.3


def test_unknown_scores_by_hand():
    gallery = Gallery(np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 1.0], [4.0, 3.0]], np.float32),
                      [0, 0, 1, 1, 1], ["a", "b"], list("pqrst"))
    query = np.array([[1.0, 0.0]], np.float32)
    matches = gallery.search(query, 2)
    assert openset.unknown_scores("nearest", gallery, query, matches)[0] == pytest.approx(1.0)
    assert openset.unknown_scores("ratio", gallery, query, matches)[0] == pytest.approx(1.0 / 9.0)
    # class a's mean is (0, 1): distance 1 + 1
    assert openset.unknown_scores("class_mean", gallery, query, matches)[0] == pytest.approx(2.0)
    # class b's nearest-neighbour distances are 1, 1 and 4: scale 1; class a has 2 images: the median scale
    scales = openset.class_scales(gallery)
    assert scales.tolist() == [1.0, 1.0]
    assert openset.unknown_scores("class_scaled", gallery, query, matches, scales)[0] == pytest.approx(1.0)


def test_simulated_unknowns_leave_each_class_fold_out_and_cross_fit():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 4
    labels = np.repeat(np.arange(6), 5)
    gallery = Gallery((centres[labels] + rng.normal(size=(30, 8))).astype(np.float32), labels,
                      [f"c{i}" for i in range(6)], [str(i) for i in range(30)])
    query_labels = np.repeat(np.arange(6), 2)
    queries = (centres[query_labels] + rng.normal(size=(12, 8))).astype(np.float32)
    names = [f"c{i}" for i in query_labels]
    rounds = openset.simulate_unknowns(gallery, queries, names, lambda g, q: g.search(q, 2), folds=3, seed=1)
    assert len(rounds) == 3
    assert sum(len(r.unknown["nearest"]) for r in rounds) == 12  # each query is unknown in exactly one round
    assert all(len(r.known["nearest"]) == 8 and r.correct.all() for r in rounds)  # well-separated classes
    result = openset.calibrate(rounds, "auto", "known_accept", 0.9, 0.8)
    assert result["score"] in openset.SCORES and result["auroc"] == max(result["auroc_by_score"].values())
    known = np.concatenate([r.known[result["score"]] for r in rounds])
    assert np.mean(known <= result["threshold"]) >= 0.9
    assert result["unknown_rejected"] > 0.9 and result["target_met"]  # far-apart classes are easy to reject
    assert [p["known_accept_target"] for p in result["operating_points"]] == list(openset.OPERATING_POINTS)
    with pytest.raises(ValueError, match="at least two classes"):
        openset.simulate_unknowns(Gallery(queries[:2], [0, 0], ["a"], ["x", "y"]), queries, names,
                                  lambda g, q: g.search(q, 2))


def test_baseline_check_names_the_shortfall_in_one_sentence():
    scores = QueryScores.model_construct(top1=0.786, map_at_r=0.6)  # only the figures the check reads
    baselines = {"baseline_raw_pixels": Baseline.model_construct(top1=0.957, map_at_r=0.5),
                 "baseline_untrained": Baseline.model_construct(top1=0.7, map_at_r=0.4)}
    check = baseline_check(scores, baselines)
    assert not check.passed and "top-1 0.7860 against raw pixels 0.9570" in check.sentence
    assert "cannot become champion" in check.sentence and check.sentence.count(".") >= 1
    scores.top1 = 0.99
    assert baseline_check(scores, baselines).passed and not baseline_check(scores, baselines, margin=0.05).passed
    assert not baseline_check(QueryScores.model_construct(top1=1.0, map_at_r=1.0), {}).passed  # baselines not scored


def test_few_shot_falls_back_to_fewer_ways_and_says_so():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 6)
    embeddings = rng.normal(size=(5, 4))[labels] * 50 + rng.normal(size=(30, 4))
    results, notes = few_shot_report(embeddings, labels, n_way=20, shots=[1, 5, 6], episodes=20)
    assert set(results) == {"1shot", "5shot"}
    assert results["1shot"]["n_way"] == results["5shot"]["n_way"] == 5 and results["5shot"]["mean"] == 1.0
    assert "5-way instead of 20-way" in notes[0] and "6-shot skipped" in notes[2]


def test_flat_metrics_keeps_numbers_and_drops_tables():
    report = EvaluationReport.model_validate({
        "top1": 0.5, "top3": 0.75, "class_avg_accuracy": 0.5, "macro_precision": 0.25, "n_queries": 4,
        "per_class_accuracy": {"a": 1.0}, "per_class_precision": {"a": 1.0}, "per_class_recall": {"a": 1.0},
        "confusion_matrix": {"labels": ["a"], "matrix": [[4]]}, "map_at_r": 0.6,
        "calibration": {"score": "ratio", "threshold": 0.3, "fit_to": "known_accept", "known_accept_target": 0.9,
                        "unknown_reject_target": 0.8, "target_met": True, "target_judged_on": "x",
                        "known_accepted": 0.9, "unknown_rejected": 0.7, "accuracy_with_rejection": 0.8, "auroc": 0.85,
                        "auroc_by_score": {"ratio": 0.85}, "operating_points": [], "rounds": 3, "method": "m"},
        "baseline_untrained": {"top1": 0.25, "top3": 0.5, "class_avg_accuracy": 0.25, "map_at_r": 0.2,
                               "macro_precision": 0.1},
        "baseline_check": {"passed": False, "margin": 0.0, "sentence": "x."},
        "fewshot": {"1shot": {"mean": 0.9, "ci95": 0.01, "episodes": 10, "n_way": 5, "k_shot": 1}}, "notes": ["x"]})
    assert flat_metrics(report) == {
        "top1": 0.5, "top3": 0.75, "class_avg_accuracy": 0.5, "macro_precision": 0.25, "n_queries": 4, "map_at_r": 0.6,
        "calibration.threshold": 0.3, "calibration.known_accept_target": 0.9, "calibration.unknown_reject_target": 0.8,
        "calibration.known_accepted": 0.9, "calibration.unknown_rejected": 0.7,
        "calibration.accuracy_with_rejection": 0.8, "calibration.auroc": 0.85, "calibration.auroc_by_score.ratio": 0.85,
        "calibration.rounds": 3, "baseline_untrained.top1": 0.25, "baseline_untrained.top3": 0.5,
        "baseline_untrained.class_avg_accuracy": 0.25, "baseline_untrained.map_at_r": 0.2,
        "baseline_untrained.macro_precision": 0.1, "baseline_check.margin": 0.0, "fewshot.1shot.mean": 0.9,
        "fewshot.1shot.ci95": 0.01, "fewshot.1shot.episodes": 10, "fewshot.1shot.n_way": 5, "fewshot.1shot.k_shot": 1}


def test_top_k_is_named_by_its_k_in_the_json():
    figures = {"top1": 0.5, "top3": 0.75, "class_avg_accuracy": 0.5, "map_at_r": 0.4, "macro_precision": 0.25}
    baseline = Baseline.model_validate(figures)
    assert (baseline.top_k, baseline.top_k_accuracy, baseline.top_k_name) == (3, 0.75, "top3")
    assert baseline.to_dict() == figures and list(baseline.to_dict()) == list(figures)
    alone = Baseline.model_validate({key: value for key, value in figures.items() if key != "top3"})
    assert (alone.top_k, alone.top_k_accuracy) == (1, 0.5) and "top_k" not in alone.to_dict()  # k = 1: top1 alone
    with pytest.raises(ValidationError):
        Baseline.model_validate({**figures, "top_5": 1.0})  # a key the report does not have


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
    store_threshold(tmp_path / "bundle", threshold, {"score": "nearest", "target_met": False})
    loaded = SiameseRecognizer.load(tmp_path / "bundle")
    assert loaded.threshold == threshold and loaded.calibration == {"score": "nearest", "target_met": False}
    rejected = loaded.predict(test.paths, reject=True)
    for before, after in zip(plain, rejected):
        assert after.label == (UNKNOWN if before.distance > threshold else before.label)
        assert after.unknown_score == pytest.approx(before.distance, abs=1e-6)  # the nearest-distance score
        assert after.distance == pytest.approx(before.distance, abs=1e-6) and len(after.top_k) == len(before.top_k)
    assert {m.label for m in rejected} >= {UNKNOWN} and len({m.label for m in rejected}) > 1
    # reject_unknown: auto stays off while the calibration missed its target, and turns on when it met it
    assert [m.label for m in loaded.predict(test.paths)] == [m.label for m in plain]
    store_threshold(tmp_path / "bundle", threshold, {"score": "nearest", "target_met": True})
    assert [m.label for m in SiameseRecognizer.load(tmp_path / "bundle").predict(test.paths)] == [
        m.label for m in rejected]
    loaded = loaded.with_settings(reject_unknown=False)
    assert [m.label for m in loaded.predict(test.paths)] == [m.label for m in plain]
    loaded = loaded.with_settings(reject_unknown=True)
    assert [m.label for m in loaded.predict(test.paths)] == [m.label for m in rejected]


def test_assess_scores_baselines_open_set_and_few_shot(untrained):
    recognizer, train, test, heldout = untrained
    result = assess(recognizer, test, train, heldout)
    report = result.report
    queries = recognizer.embed(test.paths)
    gallery = recognizer.gallery
    assert report.n_queries == len(test)
    assert report.map_at_r == pytest.approx(float(np.nanmean(average_precision_at_r(
        squared_distances(queries, gallery.embeddings), test.label_names,
        np.asarray(gallery.class_names)[gallery.labels]))))
    assert set(report.baseline_raw_pixels.to_dict()) >= {"top1", "top5", "map_at_r"}
    # the untrained baseline is this very network: the same figures
    assert report.baseline_untrained.top1 == report.top1
    assert report.calibration.rounds == 3  # 3 gallery classes: each left out once
    assert report.open_set.n_unknown == len(heldout) and report.open_set.score == report.calibration.score
    assert len(result.known_scores) == len(test) and len(result.unknown_scores) == len(heldout)
    assert report.baseline_check.passed is False  # the untrained network cannot beat itself
    assert report.fewshot["1shot"].n_way == 2 and report.fewshot["5shot"].n_way == 2
    assert any("2-way instead of 20-way" in note for note in report.notes)
    assert len(result.unknown_distances) == len(heldout) and result.correct.shape == (len(test),)
    with pytest.raises(DatasetError, match="held-out classes must be new"):
        assess(recognizer, test, heldout=train)


def test_the_report_round_trips_through_evaluation_json(untrained, tmp_path):
    recognizer, train, test, heldout = untrained
    report = assess(recognizer, test, train, heldout).report
    write_json(tmp_path / "evaluation.json", report.to_dict())  # as the evaluate stage writes it
    read = EvaluationReport.read(tmp_path / "evaluation.json")
    write_json(tmp_path / "again.json", read.to_dict())
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "evaluation.json").read_bytes()
    assert json.dumps(flat_metrics(read)) == json.dumps(flat_metrics(report))
    assert list(read.to_dict()) == [
        "top1", "top5", "class_avg_accuracy", "macro_precision", "n_queries", "per_class_accuracy",
        "per_class_precision", "per_class_recall", "confusion_matrix", "map_at_r", "calibration",
        "baseline_raw_pixels", "baseline_untrained", "baseline_check", "open_set", "fewshot", "notes"]
    assert list(read.to_dict()["baseline_raw_pixels"]) == [
        "top1", "top5", "class_avg_accuracy", "map_at_r", "macro_precision", "fewshot", "size"]


def test_a_report_without_optional_sections_leaves_them_out(tmp_path):
    recognizer, _, test, _ = untrained_recognizer(tmp_path, top_k=1)
    report = assess(recognizer, test).report  # no baselines, no held-out classes, top-k is top-1
    assert list(report.to_dict()) == [
        "top1", "class_avg_accuracy", "macro_precision", "n_queries", "per_class_accuracy", "per_class_precision",
        "per_class_recall", "confusion_matrix", "map_at_r", "calibration", "baseline_check", "notes"]
    write_json(tmp_path / "evaluation.json", report.to_dict())
    assert json.dumps(EvaluationReport.read(tmp_path / "evaluation.json").to_dict()) == json.dumps(report.to_dict())
