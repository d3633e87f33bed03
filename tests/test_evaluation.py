"""Evaluation metrics on hand-computed cases, threshold calibration, rejection of unknown images, and `assess`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.doc_figures import render
from pipelines.files import write_json
from siamese_core import openset
from siamese_core.distance import squared_distances
from siamese_core.errors import BundleError, DatasetError
from siamese_core.evaluation import PerQuery, assess, assess_bundle, baseline_check
from siamese_core.evaluation_report import Baseline, EvaluationReport
from siamese_core.gallery import Gallery, Match
from siamese_core.metrics import (
    accuracy_report,
    average_precision_at_r,
    bootstrap_interval,
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


def _right(n: int, right: int, seed: int | None = None) -> PerQuery:
    """Per-query values of n queries, ``right`` of them right (the first ones, or random ones with ``seed``);
    AP@R 1 where right, 0 where wrong: the most uncertain MAP@R of that mean."""
    correct = np.zeros(n, bool)
    correct[np.random.default_rng(seed).permutation(n)[:right] if seed is not None else slice(0, right)] = True
    return PerQuery(correct, correct.astype(float))


def _both(baseline: PerQuery) -> dict[str, PerQuery]:
    return {"baseline_raw_pixels": baseline, "baseline_untrained": baseline}


def test_bootstrap_interval_by_hand():
    assert bootstrap_interval(np.full(10, 0.25)) == (0.25, 0.25)  # no spread, no uncertainty
    assert all(math.isnan(v) for v in bootstrap_interval(np.array([np.nan])))
    assert bootstrap_interval([1.0, np.nan, 0.0], 0) == bootstrap_interval([1.0, 0.0], 0)  # NaN left out; 0: median
    values = _right(400, 200, seed=3).values("top1")
    low, high = bootstrap_interval(values, seed=1)
    half = 1.96 * math.sqrt(0.25 / 400)  # the normal approximation of a proportion's interval: 0.049
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)
    assert bootstrap_interval(values, seed=1) == (low, high)  # seeded
    narrower = bootstrap_interval(values, 0.5, seed=1)
    assert low < narrower[0] < 0.5 < narrower[1] < high


def test_sixteen_queries_cannot_tell_eleven_right_from_nine():
    """The photo set of the issue: 16 test photos, the model right on 11, a baseline on 9."""
    check = baseline_check(_right(16, 11), _both(_right(16, 9)))
    assert not check.passed and check.verdict == "too few to tell" and check.n_queries == 16
    assert "too few test images to tell (16 queries)" in check.sentence and "beats" not in check.sentence
    assert "cannot become champion" in check.sentence and "evaluate.baseline_confidence" in check.sentence
    top1 = check.comparisons[0]
    assert (top1.baseline, top1.metric, top1.model, top1.against) == ("baseline_raw_pixels", "top1", 0.6875, 0.5625)
    assert top1.difference_low <= 0 < 0.125 < top1.difference_high  # two queries apart: the interval reaches 0
    plain = baseline_check(_right(16, 11), _both(_right(16, 9)), confidence=0)  # the bar lowered: figures alone
    assert plain.passed and plain.verdict == "beats" and "beats both baselines on its own test split:" in plain.sentence


def test_four_hundred_queries_tell_95_from_30_percent():
    check = baseline_check(_right(400, 380, seed=0), _both(_right(400, 120, seed=1)))
    assert check.passed and check.verdict == "beats"
    assert "beats both baselines on its own test split, beyond the 95 % interval of each difference over 400 " \
           "queries: top-1 0.9500 against at best 0.3000" in check.sentence
    assert all(0.55 < c.difference_low < 0.65 < c.difference_high < 0.75 for c in check.comparisons)
    assert not baseline_check(_right(400, 380, seed=0), _both(_right(400, 120, seed=1)), margin=0.7).passed


def test_a_model_clearly_below_a_baseline_does_not_beat_it():
    baselines = {"baseline_raw_pixels": _right(400, 380, seed=1), "baseline_untrained": _right(400, 120, seed=2)}
    check = baseline_check(_right(400, 300, seed=0), baselines)
    assert not check.passed and check.verdict == "does not beat"
    assert "does not beat its baselines on its own test split (top-1 0.7500 against raw pixels 0.9500, " \
           "difference -0." in check.sentence and "cannot become champion" in check.sentence
    assert [c.verdict for c in check.comparisons] == ["does not beat", "does not beat", "beats", "beats"]
    old = baseline_check(_right(400, 300), baselines, confidence=0)  # the figures alone, as before intervals
    assert "(top-1 0.7500 against raw pixels 0.9500; MAP@R 0.7500 against raw pixels 0.9500)" in old.sentence


def test_a_perfect_score_counts_as_not_beaten_and_missing_baselines_fail():
    check = baseline_check(_right(16, 16), _both(_right(16, 16)))
    assert check.passed and "top-1 1.0000 against at best 1.0000 (perfect)" in check.sentence
    assert not baseline_check(_right(16, 16), {}).passed  # baselines not scored
    assert baseline_check(_right(16, 16), {}).verdict is None


def test_the_committed_demo_still_beats_its_baselines():
    """metrics.json of the demo (240 queries): the model's top-1 and MAP@R against raw pixels and the untrained
    network, each figure drawn as right/wrong queries at its rate (the widest interval a mean can have)."""
    metrics = json.loads((Path(__file__).parents[1] / "metrics.json").read_text(encoding="utf-8"))
    n = metrics["n_queries"]

    def drawn(prefix: str, seed: int) -> PerQuery:
        figures = [round(metrics[f"{prefix}{key}"] * n) for key in ("top1", "map_at_r")]
        return PerQuery(_right(n, figures[0], seed).correct, _right(n, figures[1], seed + 1).values("top1"))

    check = baseline_check(drawn("", 0), {name: drawn(f"{name}.", 10 * i) for i, name in
                                          enumerate(("baseline_raw_pixels", "baseline_untrained"), start=1)})
    assert n == 240 and check.passed, check.sentence


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
        "top1_ci95": {"low": 0.25, "high": 0.75}, "map_at_r_ci95": {"low": 0.5, "high": 0.7},
        "calibration": {"score": "ratio", "threshold": 0.3, "fit_to": "known_accept", "known_accept_target": 0.9,
                        "unknown_reject_target": 0.8, "target_met": True, "target_judged_on": "x",
                        "known_accepted": 0.9, "unknown_rejected": 0.7, "accuracy_with_rejection": 0.8, "auroc": 0.85,
                        "auroc_by_score": {"ratio": 0.85}, "operating_points": [], "rounds": 3, "method": "m"},
        "baseline_untrained": {"top1": 0.25, "top3": 0.5, "class_avg_accuracy": 0.25, "map_at_r": 0.2,
                               "macro_precision": 0.1},
        "baseline_check": {"passed": False, "margin": 0.0, "sentence": "x.", "confidence": 0.95, "n_queries": 4,
                           "verdict": "too few to tell", "comparisons": [{
                               "baseline": "baseline_untrained", "metric": "top1", "model": 0.5, "against": 0.25,
                               "difference_low": -0.25, "difference_high": 0.75, "verdict": "too few to tell"}]},
        "fewshot": {"1shot": {"mean": 0.9, "ci95": 0.01, "episodes": 10, "n_way": 5, "k_shot": 1}}, "notes": ["x"]})
    assert flat_metrics(report) == {
        "top1": 0.5, "top3": 0.75, "class_avg_accuracy": 0.5, "macro_precision": 0.25, "n_queries": 4, "map_at_r": 0.6,
        "top1_ci95.low": 0.25, "top1_ci95.high": 0.75, "map_at_r_ci95.low": 0.5, "map_at_r_ci95.high": 0.7,
        "calibration.threshold": 0.3, "calibration.known_accept_target": 0.9, "calibration.unknown_reject_target": 0.8,
        "calibration.known_accepted": 0.9, "calibration.unknown_rejected": 0.7,
        "calibration.accuracy_with_rejection": 0.8, "calibration.auroc": 0.85, "calibration.auroc_by_score.ratio": 0.85,
        "calibration.rounds": 3, "baseline_untrained.top1": 0.25, "baseline_untrained.top3": 0.5,
        "baseline_untrained.class_avg_accuracy": 0.25, "baseline_untrained.map_at_r": 0.2,
        "baseline_untrained.macro_precision": 0.1, "baseline_check.margin": 0.0,
        "baseline_check.confidence": 0.95, "baseline_check.n_queries": 4, "fewshot.1shot.mean": 0.9,
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
    check = report.baseline_check
    assert check.passed is False and check.verdict == "does not beat"  # the untrained network cannot beat itself
    untrained_top1 = check.comparisons[2]
    assert (untrained_top1.baseline, untrained_top1.metric) == ("baseline_untrained", "top1")
    assert untrained_top1.difference_low == untrained_top1.difference_high == 0.0  # the same answers, query by query
    for scores in (report, report.baseline_raw_pixels):
        assert scores.top1_ci95.low <= scores.top1 <= scores.top1_ci95.high
        assert scores.map_at_r_ci95.low <= scores.map_at_r <= scores.map_at_r_ci95.high
    assert report.map_at_r_ci95.high - report.map_at_r_ci95.low > 0.05  # a handful of queries: a wide interval
    assert report.fewshot["1shot"].n_way == 2 and report.fewshot["5shot"].n_way == 2
    assert any("2-way instead of 20-way" in note for note in report.notes)
    assert len(result.unknown_distances) == len(heldout) and result.correct.shape == (len(test),)
    with pytest.raises(DatasetError, match="held-out classes must be new"):
        assess(recognizer, test, heldout=train)


def test_the_untrained_baseline_answers_with_the_models_views_and_matching(tmp_path):
    """fewshot-cpu's way of answering (test-time views, class means): the untrained network's baseline answers the
    same way, so an untrained model ties it query by query, in the test split and in the few-shot episodes (with
    one view and nearest images, the baseline gave it credit that was not training's)."""
    recognizer, train, test, heldout = untrained_recognizer(
        tmp_path, fewshot_episodes=20, **{"evaluate.test_time_views": 3, "evaluate.match": "class_mean"})
    report = assess(recognizer.with_gallery(train), test, train, heldout).report
    baseline = report.baseline_untrained
    assert (baseline.top1, baseline.map_at_r) == (report.top1, pytest.approx(report.map_at_r))
    assert baseline.fewshot["1shot"].mean == report.fewshot["1shot"].mean
    untrained = [c for c in report.baseline_check.comparisons if c.baseline == "baseline_untrained"]
    assert [(c.difference_low, c.difference_high) for c in untrained] == [(0.0, 0.0)] * 2


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
        "per_class_precision", "per_class_recall", "confusion_matrix", "map_at_r", "top1_ci95", "map_at_r_ci95",
        "calibration", "baseline_raw_pixels", "baseline_untrained", "baseline_check", "open_set", "fewshot", "notes"]
    assert list(read.to_dict()["baseline_raw_pixels"]) == [
        "top1", "top5", "class_avg_accuracy", "map_at_r", "macro_precision", "top1_ci95", "map_at_r_ci95", "fewshot",
        "size"]
    assert list(read.to_dict()["baseline_check"]) == [
        "passed", "margin", "sentence", "confidence", "n_queries", "verdict", "comparisons"]


def test_a_report_without_optional_sections_leaves_them_out(tmp_path):
    recognizer, _, test, _ = untrained_recognizer(tmp_path, top_k=1)
    report = assess(recognizer, test).report  # no baselines, no held-out classes, top-k is top-1
    assert list(report.to_dict()) == [
        "top1", "class_avg_accuracy", "macro_precision", "n_queries", "per_class_accuracy", "per_class_precision",
        "per_class_recall", "confusion_matrix", "map_at_r", "top1_ci95", "map_at_r_ci95", "calibration",
        "baseline_check", "notes"]
    write_json(tmp_path / "evaluation.json", report.to_dict())
    assert json.dumps(EvaluationReport.read(tmp_path / "evaluation.json").to_dict()) == json.dumps(report.to_dict())


def test_assess_bundle_warns_when_validation_loss_rose(untrained):
    recognizer, _, test, _ = untrained
    rising = {"loss": [0.5] * 6, "val_loss": [0.2, 0.17, 0.2, 0.26, 0.3, 0.37]}
    plain = recognizer.with_settings(baselines=False)
    assert assess_bundle(plain, test).report.validation_warning is None  # no history in its metadata
    plain.metadata = {"history": rising, "best_epoch": 6}  # as a bundle's metadata.json holds it
    report = assess_bundle(plain, test).report
    assert "lowest 0.17 at epoch 2 of 6, 0.37 at the last" in report.validation_warning
    assert report.to_dict()["validation_warning"] == report.validation_warning


def test_the_readme_demo_table_shows_intervals_where_the_metrics_have_them():
    metrics = {"n_queries": 240, "top1": 0.9458, "map_at_r": 0.8018, "baseline_raw_pixels.top1": 0.3167,
               "baseline_raw_pixels.map_at_r": 0.0724, "baseline_untrained.top1": 0.325,
               "baseline_untrained.map_at_r": 0.0954}
    assert "| **94.6 %** | 31.7 % | 32.5 % |" in render(metrics)  # an older metrics.json: no intervals
    metrics.update({"top1_ci95.low": 0.9167, "top1_ci95.high": 0.9708, "map_at_r_ci95.low": 0.77,
                    "map_at_r_ci95.high": 0.83, "baseline_untrained.top1_ci95.low": 0.2667,
                    "baseline_untrained.top1_ci95.high": 0.3833})
    table = render(metrics)
    assert "| **94.6 % [91.7, 97.1]** | 31.7 % | 32.5 % [26.7, 38.3] |" in table
    assert "| **0.802 [0.770, 0.830]** | 0.072 | 0.095 |" in table
