"""The evaluation plots and the self-contained HTML report."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from siamese_core.evaluation import assess
from siamese_core.report import (
    MAX_TICK_LABELS,
    confusion_figure,
    write_html,
    write_plots,
)

from support.models import untrained_recognizer


@pytest.fixture(scope="module")
def assessment(tmp_path_factory):
    recognizer, train, test, heldout = untrained_recognizer(tmp_path_factory.mktemp("digits"), fewshot_episodes=10)
    return recognizer, assess(recognizer, test, train, heldout)


def test_plots_are_valid_pngs_and_the_report_embeds_them(assessment, tmp_path):
    recognizer, result = assessment
    history = {"loss": [0.5, 0.3], "val_loss": [0.6, 0.4]}
    images = write_plots(result, recognizer.gallery, history, recognizer.input_size, tmp_path / "plots")
    assert sorted(p.name for p in images.values()) == [
        "confusion.png", "distances.png", "embedding.png", "loss.png", "neighbours.png", "unknown_roc.png"]
    for path in images.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()

    page = write_html(tmp_path / "report.html", result.report, images).read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(images)
    assert Image.open(io.BytesIO(base64.b64decode(embedded[0]))).format == "PNG"
    for text in ("top1", "top5", "map_at_r", "class_avg_accuracy", "raw pixels", "untrained", "auroc",
                 "accuracy_with_rejection", "2-way 1-shot", "Unknown classes: threshold and operating points",
                 "known accept target", "digit 2", "does not beat its baselines"):
        assert text in page, text
    assert "2-way instead of 20-way" in page  # the few-shot fallback note
    assert "class='flag'" in page  # the untrained network does not beat itself: flagged
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "Validation loss rose" not in page


def test_the_report_shows_intervals_the_baseline_comparisons_and_the_validation_warning(assessment, tmp_path):
    _, result = assessment
    report = result.report.model_copy(update={"validation_warning": "Validation loss rose over most of training: "
                                              "lowest 0.17 at epoch 2 of 6, 0.37 at the last."})
    page = write_html(tmp_path / "report.html", report, {}).read_text(encoding="utf-8")
    for scores in (report, report.baseline_raw_pixels, report.baseline_untrained):
        for key in ("top1", "map_at_r"):
            interval = getattr(scores, f"{key}_ci95")
            assert f"{getattr(scores, key):.4f} [{interval.low:.4f}, {interval.high:.4f}]" in page
    assert "difference (95 % interval)" in page and "does not beat" in page
    assert "untrained</td><td>top1</td>" in page
    assert "<p class='flag'>Validation loss rose over most of training: lowest 0.17 at epoch 2 of 6" in page


def test_confusion_matrix_with_many_classes_stays_readable():
    labels = [f"class {i:03d}" for i in range(120)][::-1]
    matrix = np.diag(np.full(120, 3)) + np.eye(120, k=1, dtype=int)
    ax = confusion_figure(labels, matrix).axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert len(names) <= MAX_TICK_LABELS and names[:2] == ["class 000", "class 003"]  # sorted, thinned
    assert not ax.texts  # no per-cell counts at this size
    few = confusion_figure(["b", "a"], [[2, 1], [0, 3]]).axes[0]
    assert [t.get_text() for t in few.texts] == ["3", "1", "2"]  # sorted: a first; zero cells left empty
