"""Stage evaluate: score the bundle on the test folder beside the raw-pixel and untrained baselines."""

from __future__ import annotations

import logging

from siamese_core.data import scan_folder
from siamese_core.evaluation import assess_bundle
from siamese_core.io import atomic_dir
from siamese_core.metrics import flat_metrics
from siamese_core.recognizer import SiameseRecognizer
from siamese_core.reference import reference_profile
from siamese_core.report import write_plots

from ..files import read_json, write_csv, write_json
from ..pipeline import (
    BUNDLE,
    CONFUSION_PLOT,
    EVALUATION,
    HISTORY_FILE,
    IMAGE_PLOTS,
    LOSS_PLOT,
    METRICS,
    PER_CLASS_PLOT,
    REFERENCE,
    TRAINED,
    StageContext,
)

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Write metrics.json (flat figures), artifacts/evaluation.json (the whole report), artifacts/reference.npz
    (what normal traffic looks like, for the monitoring), plots/*.csv and plots/images/.

    Says whether the model beats both baselines, calibrates the unknown-class threshold on classes left
    out of the gallery and, when ``data.heldout_dir`` is set, scores known against held-out classes and
    few-shot enrolment of the held-out classes (for the baselines too). The bundle is searched with the
    ``evaluate`` settings of params.yaml.
    """
    params = ctx.params
    recognizer = SiameseRecognizer.load(ctx.path(BUNDLE), ctx.sharder).with_settings(params.evaluate)
    heldout = scan_folder(params.data.heldout_dir) if params.data.heldout_dir else None
    assessment = assess_bundle(recognizer, scan_folder(params.data.test_dir), heldout)
    report = assessment.report
    history = read_json(ctx.path(TRAINED / HISTORY_FILE))["history"]
    loss, val_loss = history.get("loss", []), history.get("val_loss", [])
    write_csv(ctx.path(LOSS_PLOT), ["epoch", "loss", "val_loss"],
              [(i + 1, v, val_loss[i] if i < len(val_loss) else "") for i, v in enumerate(loss)])
    write_csv(ctx.path(PER_CLASS_PLOT), ["class", "accuracy", "precision"],
              [(name, accuracy, report.per_class_precision[name]) for name, accuracy in report.per_class_accuracy.items()])
    labels, matrix = report.confusion_matrix.labels, report.confusion_matrix.matrix
    write_csv(ctx.path(CONFUSION_PLOT), ["actual", "predicted"],
              [(labels[i], labels[j]) for i, row in enumerate(matrix) for j, n in enumerate(row) for _ in range(n)])
    with atomic_dir(ctx.path(IMAGE_PLOTS)) as tmp:
        write_plots(assessment, recognizer.gallery, history, recognizer.input_size, tmp)
    write_json(ctx.path(EVALUATION), report.to_dict())
    reference_profile(assessment, recognizer, params.train.seed).save(ctx.path(REFERENCE))
    metrics = flat_metrics(report)
    write_json(ctx.path(METRICS), metrics)
    for note in report.notes:
        log.warning("evaluate: %s", note)
    check = report.baseline_check
    log.log(logging.INFO if check.passed else logging.WARNING, "evaluate: %s", check.sentence)
    log.info("evaluate: top1 %.4f%s; %.1f ms per query with %d test-time view(s)", metrics["top1"], "".join(
        f", {k}-shot {metrics[f'fewshot.{k}shot.mean']:.4f}" for k in params.evaluate.fewshot_shots
        if f"fewshot.{k}shot.mean" in metrics), assessment.ms_per_query, params.evaluate.test_time_views)
    return metrics
