"""Stage register: log the evaluation to the run, register the bundle behind the champion gate,
write the report, and try the champion on one test image."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from siamese_core.data import colour_share, scan_folder
from siamese_core.errors import DatasetError
from siamese_core.evaluation_report import EvaluationReport
from siamese_core.recognizer import store_threshold
from siamese_core.reference import REFERENCE_FILE
from siamese_core.report import report_images, write_html

from .. import registry, scoring, tracking
from ..card import changed_params, model_card, run_summary, summary_notes
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
from ..pyfunc_model import encode_image

log = logging.getLogger(__name__)
COUNT_KEYS = ("episodes", "n_way", "k_shot", "n_queries", "n_known", "n_unknown", "size")
LINEAGE_TAGS = ("git_commit", "dvc.experiment", "prefect.flow_run_url", "training_run_id")


def run(ctx: StageContext) -> dict:
    """Register the bundle (with the threshold evaluate calibrated) as a new version; its description is its
    model card. Writes artifacts/report.html and artifacts/registration.json, all inside the run, which
    ends FAILED if any step fails. Refuses to register when the data changed while the run was in progress.
    """
    params, run = ctx.params, ctx.tracking.run
    versions = tracking.data_versions(params)
    data = tracking.data_hash(params, versions)
    mlflow_run = run.client.get_run(run.run_id)
    started_on = mlflow_run.data.tags.get("data_hash")
    if started_on and started_on != data:
        raise DatasetError(f"the data changed while this run was in progress (from {started_on} to {data}): "
                           "its model may mix both versions, so it is not registered; run the pipeline again")
    evaluation = EvaluationReport.read(ctx.path(EVALUATION))
    metrics = {key: value for key, value in read_json(ctx.path(METRICS)).items()
               if not key.endswith(COUNT_KEYS)}  # counts stay in metrics.json; MLflow charts figures
    run.client.log_table(run.run_id, {
        "class": list(evaluation.per_class_accuracy), "accuracy": list(evaluation.per_class_accuracy.values()),
        "precision": list(evaluation.per_class_precision.values()), "recall": list(evaluation.per_class_recall.values())},
        "per_class.json")
    artifacts = [ctx.path(p) for p in (TRIPLETS_SUMMARY, VALIDATION, VALIDATION_TEXT, EVALUATION, METRICS,
                                       IMAGE_PLOTS, LOSS_PLOT, PER_CLASS_PLOT, CONFUSION_PLOT)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / BUNDLE.name
        shutil.copytree(ctx.path(BUNDLE), bundle)
        if evaluation.calibration is not None:
            store_threshold(bundle, evaluation.calibration.threshold, evaluation.calibration.to_dict())
        shutil.copy(ctx.path(REFERENCE), bundle / REFERENCE_FILE)
        result = registry.log_and_register(
            run, params, bundle, metrics, artifacts, {"data_hash": data},
            score_champion=scoring.same_queries_scorer(bundle, params.data.train_dir, params.data.test_dir,
                                                       params.register.metric),
            baselines=evaluation.baseline_check.to_dict())
    lineage = {"MLflow run": f"{mlflow_run.info.run_name} ({run.run_id})",
               **{key: value for key, value in mlflow_run.data.tags.items() if key in LINEAGE_TAGS}}
    registry.describe_version(result["model_name"], result["version"], model_card(
        params, metrics, tracking.data_profiles(params, versions), lineage, result["version"], result["decision"],
        result["previous_champion_value"], result["reason"], evaluation))
    record = {**result, "git_commit": tracking.git_commit(), "data_hash": data, "data_versions": versions}
    write_html(ctx.path(REPORT), evaluation, report_images(ctx.path(IMAGE_PLOTS)),
               title=f"{result['model_name']} version {result['version']}: evaluation on {params.data.test_dir}",
               header=_report_header(params, record, versions))
    run.log_artifact(ctx.path(REPORT))
    record["sample_prediction"] = _try_champion(params)
    train = scan_folder(params.data.train_dir)
    record["notes"] = summary_notes(params, evaluation, record["sample_prediction"], colour_share(list(train.paths)))
    write_json(ctx.path(REGISTRATION), record)
    log.info("%s version %s is %s: %s", result["model_name"], result["version"], result["decision"], result["reason"])
    log.info("\n%s", run_summary(record, read_json(ctx.path(METRICS)), ctx.path(REPORT), mlflow_run.info.experiment_id))
    return record


def _try_champion(params) -> dict:
    """The champion's answer for the first test image, loaded and asked as a served model is."""
    test = scan_folder(params.data.test_dir)
    champion = registry.load_champion(params.register.model_name)
    answer = champion.predict(pd.DataFrame({"image": [encode_image(test.paths[0])]})).iloc[0]
    return {"image": test.paths[0], "true_label": test.label_names[0],
            "label": answer["label"], "distance": float(answer["distance"])}


def _report_header(params, record: dict, versions: dict[str, str]) -> dict[str, str]:
    changed = ", ".join(f"{key}={value}" for key, (value, _) in sorted(changed_params(params).items()))
    return {
        "model version": f"{record['model_name']} version {record['version']} ({record['decision']})",
        "MLflow run": f"{record['run_name']} ({record['run_id']})",
        "data version (DVC md5)": ", ".join(f"{split} {digest}" for split, digest in versions.items()),
        "git commit": record["git_commit"],
        "params changed from the defaults": changed or "none",
    }
