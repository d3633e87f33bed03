"""Stage register, one job per step: check the data is the run's, register the evaluated bundle behind the champion
gate (logging the evaluation and writing the model card), write the report, try the champion on one test image, and
summarise."""

from __future__ import annotations

import logging
import shutil
import tempfile
from functools import partial
from pathlib import Path

from siamese_core.evaluation_report import EvaluationReport
from siamese_core.recognizer import store_threshold
from siamese_core.reference import REFERENCE_FILE
from siamese_core.report import report_images, write_html

from .. import registry, scoring, tracking
from ..card import model_card, report_header, run_summary, summary_notes
from ..files import read_json, write_json
from ..pipeline import (
    BUNDLE,
    CONFUSION_PLOT,
    EVALUATION,
    IMAGE_PLOTS,
    LOSS_PLOT,
    METRICS,
    PER_CLASS_PLOT,
    REFERENCE,
    REGISTRATION,
    REPORT,
    TRIPLETS_SUMMARY,
    VALIDATION,
    VALIDATION_TEXT,
    StageContext,
)

log = logging.getLogger(__name__)
COUNT_KEYS = ("episodes", "n_way", "k_shot", "n_queries", "n_known", "n_unknown", "size")
LOGGED = (TRIPLETS_SUMMARY, VALIDATION, VALIDATION_TEXT, EVALUATION, METRICS, IMAGE_PLOTS, LOSS_PLOT, PER_CLASS_PLOT,
          CONFUSION_PLOT)


def run(ctx: StageContext) -> dict:
    """Register the bundle (with the threshold evaluate calibrated) as a new version; its description is its
    model card. Writes artifacts/report.html and artifacts/registration.json, all inside the run, which
    ends FAILED if any step fails. Refuses to register when the data changed while the run was in progress.
    """
    params = ctx.params
    with tempfile.TemporaryDirectory() as tmp:
        evaluation, metrics, baselines, bundle = _evaluated_bundle(ctx, Path(tmp))
        logged, report, plots = [ctx.path(name) for name in LOGGED], ctx.path(REPORT), ctx.path(IMAGE_PLOTS)
        run = ctx.tracking.run
        data = tracking.unchanged_data(params, run)
        card = partial(_card, params, metrics, data, run.lineage(), evaluation)
        scorer = scoring.same_queries_scorer(bundle, params.data.train_dir, params.data.test_dir, params.register.metric)
        result = registry.log_and_register(
            run, params, bundle, {key: value for key, value in metrics.items() if not key.endswith(COUNT_KEYS)},
            logged, {"data_hash": data.digest}, score_champion=scorer, baselines=baselines, card=card)
    record = {**result, "git_commit": data.commit, "data_hash": data.digest, "data_versions": data.versions}
    header = report_header(params, record)
    write_html(report, evaluation, report_images(plots), header=header,
               title=f"{result['model_name']} version {result['version']}: evaluation on {params.data.test_dir}")
    run.log_artifact(report)  # before the champion is tried: a run that fails there keeps its report
    record["sample_prediction"] = registry.sample_prediction(params)
    record["notes"] = summary_notes(params, evaluation, record["sample_prediction"],
                                    data.profiles["train"]["colour_share"])
    summary = run_summary(record, metrics, report, record["experiment_id"])
    write_json(ctx.path(REGISTRATION), record)
    log.info("%s version %s is %s: %s", result["model_name"], result["version"], result["decision"], result["reason"])
    log.info("\n%s", summary)
    return record


def _evaluated_bundle(ctx: StageContext, tmp: Path) -> tuple[EvaluationReport, dict, dict, Path]:
    """The evaluation report, metrics.json's figures, the baseline check for the gate, and a copy of the bundle under
    ``tmp`` holding the calibrated threshold and the reference profile; the per-class figures are logged to the run
    as a table."""
    evaluation = EvaluationReport.read(ctx.path(EVALUATION))
    bundle = tmp / BUNDLE.name
    shutil.copytree(ctx.path(BUNDLE), bundle)
    if evaluation.calibration is not None:
        store_threshold(bundle, evaluation.calibration.threshold, evaluation.calibration.to_dict())
    shutil.copy(ctx.path(REFERENCE), bundle / REFERENCE_FILE)
    run = ctx.tracking.run
    run.client.log_table(run.run_id, {
        "class": list(evaluation.per_class_accuracy), "accuracy": list(evaluation.per_class_accuracy.values()),
        "precision": list(evaluation.per_class_precision.values()), "recall": list(evaluation.per_class_recall.values())},
        "per_class.json")
    return evaluation, read_json(ctx.path(METRICS)), evaluation.baseline_check.to_dict(), bundle


def _card(params, metrics: dict, data: tracking.DataIdentity, lineage: dict[str, str], evaluation: EvaluationReport,
          result: dict) -> str:
    return model_card(params, metrics, data.profiles, lineage, result["version"], result["decision"],
                      result["previous_champion_value"], result["reason"], evaluation)
