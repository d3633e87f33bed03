"""The model card and the run summary: figures a user can weigh (intervals, the baseline verdict), whether unknowns
are rejected and why not, the sample prediction marked right or wrong, and a preset likely to do better."""

import re

import numpy as np
from PIL import Image

from pipelines.card import model_card, preset_hint, rejection_line, run_summary, summary_notes
from siamese_core.data import colour_share
from siamese_core.evaluation_report import BaselineCheck, BaselineComparison, Calibration, EvaluationReport

from support.models import pipeline_params

METRICS = {"top1": 0.6875, "top1_ci95.low": 0.44, "top1_ci95.high": 0.88, "baseline_raw_pixels.top1": 0.375,
           "baseline_raw_pixels.top1_ci95.low": 0.19, "baseline_raw_pixels.top1_ci95.high": 0.62,
           "baseline_untrained.top1": 0.5625, "map_at_r": 0.566, "calibration.threshold": 0.7}


def _evaluation(verdict="too few to tell", target_met=False, warning=None) -> EvaluationReport:
    check = BaselineCheck(passed=verdict == "beats", margin=0.0, confidence=0.95, n_queries=16, verdict=verdict,
                          sentence="Too few test images to tell (16 queries) whether it beats its baselines.",
                          comparisons=[BaselineComparison(baseline="raw pixels", metric="top-1", model=0.6875,
                                                          against=0.375, difference_low=0.06, difference_high=0.56,
                                                          verdict="beats"),
                                       BaselineComparison(baseline="the untrained network", metric="top-1",
                                                          model=0.6875, against=0.5625, difference_low=-0.12,
                                                          difference_high=0.37, verdict="too few to tell")])
    calibration = Calibration.model_construct(score="nearest", threshold=0.7, target_met=target_met,
                                              known_accepted=0.9, unknown_rejected=0.178, unknown_reject_target=0.8)
    return EvaluationReport.model_construct(baseline_check=check, calibration=calibration, validation_warning=warning)


def test_the_card_shows_intervals_the_comparisons_and_the_training_warning():
    warning = "Validation loss rose over most of training: its minimum was at epoch 2 of 18."
    card = model_card(pipeline_params(), METRICS, {}, {}, "3", "challenger", None, "", _evaluation(warning=warning))
    assert re.search(r"^top1\s+0\.6875 \[0\.44, 0\.88\]\s+0\.3750 \[0\.19, 0\.62\]\s+0\.5625$", card, re.M), card
    assert "(95% interval of the difference)" in card
    assert re.search(r"^top-1\s+the untrained network\s+\[-0\.120, \+0\.370\]\s+too few to tell$", card, re.M), card
    assert f"**Training:** {warning}" in card


def test_rejection_says_why_not_when_it_is_off():
    params = pipeline_params()
    assert rejection_line(params, _evaluation(target_met=True)).startswith("unknowns: rejected above 0.7")
    off = rejection_line(params, _evaluation(target_met=False))
    assert off.startswith("unknowns: not rejected (the calibration missed its target: 18% of unknown queries")
    assert "false" in rejection_line(params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"reject_unknown": False})}), _evaluation(target_met=True))
    assert "no threshold was calibrated" in rejection_line(params, None)


def test_the_summary_marks_the_sample_right_or_wrong_and_names_a_better_preset():
    params = pipeline_params()
    sample = {"image": "test/a/1.png", "true_label": "a", "label": "b", "distance": 0.25}
    notes = summary_notes(params, _evaluation(warning="loss rose"), sample, colour=0.9)
    assert notes[0].startswith("baselines: Too few test images to tell (16 queries)")
    assert "training: loss rose" in notes
    assert notes[-2].endswith("with 'b' at distance 0.2500: wrong")
    assert "photos-cpu" in notes[-1]
    right = summary_notes(params, _evaluation(verdict="beats"), {**sample, "label": "a"}, colour=0.0)
    assert right[-1].endswith(": right") and not any(n.startswith("baselines") for n in right)
    assert preset_hint("efficientnet_lite0", 0.0) and preset_hint("efficientnet_lite0", 1.0) is None
    record = {"model_name": "m", "version": "3", "decision": "challenger", "notes": notes, "run_id": "r",
              "run_name": "n"}
    text = run_summary(record, METRICS, "report.html", "0")
    assert "95 % intervals of top-1: model [0.44, 0.88]   raw [0.19, 0.62]" in text and notes[-1] in text


def test_colour_share_tells_photos_from_drawings(tmp_path):
    rng = np.random.default_rng(0)
    photos = [tmp_path / f"p{i}.png" for i in range(4)]
    drawings = [tmp_path / f"d{i}.png" for i in range(4)]
    for path in photos:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    for path in drawings:
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).convert("RGB").save(path)
    assert colour_share([str(p) for p in photos]) == 1.0 and colour_share([str(p) for p in drawings]) == 0.0
    assert colour_share([str(tmp_path / "missing.png")]) == 0.0
