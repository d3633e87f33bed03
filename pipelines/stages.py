"""The pipeline stages: one implementation, run by ``dvc repro`` and by the Prefect flows.

Each stage reads what dvc.yaml declares for it and writes its outputs atomically under a
workspace root: the project root under ``dvc repro`` (paths as dvc.yaml names them), or a
flow run's own folder (``runs/<run>/``), so concurrent runs never share a file. Data folders
are read where params.yaml puts them and never written. Run one stage with
``python -m pipelines.stages <stage> [--params params.yaml] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from siamese_core.config import parse_set_options
from siamese_core.errors import DatasetError
from siamese_core.io import atomic_dir, atomic_path, ensure_writable

from .errors import PIPELINE_USER_ERRORS
from .files import read_json, write_csv, write_json
from .params import PipelineParams, load_params
from .process import import_tensorflow_quietly, terminate_as_interrupt

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is imported later, by the stages that need it

# Outputs, relative to the workspace root.
VALIDATION = Path("artifacts/validation.json")
VALIDATION_TEXT = Path("artifacts/validation.txt")
TRIPLETS = Path("artifacts/triplets.csv")
TRIPLETS_SUMMARY = Path("artifacts/triplets_summary.json")
TRAINED = Path("artifacts/train")
BUNDLE = Path("artifacts/bundle")
EVALUATION = Path("artifacts/evaluation.json")
REGISTRATION = Path("artifacts/registration.json")
REPORT = Path("artifacts/report.html")
METRICS = Path("metrics.json")
LOSS_PLOT = Path("plots/loss.csv")
PER_CLASS_PLOT = Path("plots/per_class.csv")
CONFUSION_PLOT = Path("plots/confusion.csv")
IMAGE_PLOTS = Path("plots/images")
HISTORY_FILE, RUN_FILE = "history.json", "run.json"
PER_CLASS_METRICS = ("per_class_accuracy", "per_class_precision", "per_class_recall")
COUNT_KEYS = ("episodes", "n_way", "k_shot", "n_queries", "n_known", "n_unknown", "size")

log = logging.getLogger("pipelines.stages")


def validate(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Check the train/test (and held-out) folders; write the validation report; raise on errors.

    Warnings are reported and the pipeline goes on. A failed validation is logged to the
    pipeline's MLflow run with its report, or, with no run open yet, as a FAILED run of its own.
    """
    from siamese_core.validation import validate_dataset

    data = params.data
    report = validate_dataset(data.train_dir, data.test_dir, open_set=data.open_set, strict=data.strict,
                              imbalance_ratio=data.imbalance_ratio, min_side=data.min_side)
    write_json(root / VALIDATION, report.to_dict())
    with atomic_path(root / VALIDATION_TEXT) as tmp:
        tmp.write_text(report.text(max_paths=50) + "\n", encoding="utf-8")
    log.info("%s", report.text())
    if not report.ok:
        codes = ", ".join(sorted({f.code for f in report.errors}))
        error = DatasetError(
            f"dataset validation failed with {len(report.errors)} errors ({codes}): "
            f"{report.errors[0].message}; full report in {root / VALIDATION_TEXT}"
        )
        reports = [root / VALIDATION, root / VALIDATION_TEXT]
        if run is None:
            from .tracking import log_failed_stage

            log_failed_stage(params, "validate", reports, error)
        else:
            for path in reports:
                run.log_artifact(path)
        raise error
    splits = report.summary["splits"]
    return {"train": splits["train"]["images"], "test": splits["test"]["images"],
            "classes": splits["train"]["classes"], "warnings": len(report.warnings)}


def triplets(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Mine the training triplets into artifacts/triplets.csv, with a summary JSON."""
    from siamese_core.data import scan_folder
    from siamese_core.train import mine_triplets
    from siamese_core.triplets import save_triplets

    table = mine_triplets(params.core(), scan_folder(params.data.train_dir))
    save_triplets(table, root / TRIPLETS)
    summary = {
        "strategy": params.triplets.strategy,
        "max_pairs_per_class": params.triplets.max_pairs_per_class,
        "triplets": len(table),
        "per_class": {name: int(n) for name, n in table["anchor_class"].value_counts().sort_index().items()},
    }
    write_json(root / TRIPLETS_SUMMARY, summary)
    log.info("triplets: %d (%s)", len(table), params.triplets.strategy)
    return {"triplets": len(table), "strategy": params.triplets.strategy}


def train(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Train on the triplet table, logging each epoch to the MLflow run as it ends.

    Under ``dvc repro`` this stage opens the pipeline's MLflow run; its id goes into
    artifacts/train/run.json beside model.keras and history.json, for the later stages.
    """
    from siamese_core.recognizer import MODEL_FILE
    from siamese_core.train import train as fit
    from siamese_core.triplets import load_triplets

    from .tracking import PipelineRun

    ensure_writable((root / TRAINED).parent, "the trained model")  # before training, not after it
    opened = run is None  # under dvc repro: this stage opens the run, and watches the machine while it trains
    run = run or PipelineRun.start(params)
    with run.failing_on_error("train"), run.system_metrics() if opened else nullcontext():
        result = fit(params.core(), params.data.train_dir, params.data.test_dir, triplets=load_triplets(root / TRIPLETS),
                     callbacks=[run.epoch_callback()], verbose=0, heldout_dir=params.data.heldout_dir)
        with atomic_dir(root / TRAINED) as tmp:
            result.embedding.save(tmp / MODEL_FILE)
            write_json(tmp / HISTORY_FILE, {"best_epoch": result.best_epoch, "history": result.history})
            write_json(tmp / RUN_FILE, {"run_id": run.run_id})
    last = {key: values[-1] for key, values in result.history.items()}
    log.info("train: kept the weights of epoch %d (%s); last epoch: %s", result.best_epoch, result.kept_because,
             ", ".join(f"{key} {value:.4g}" for key, value in last.items()))
    return {"best_epoch": result.best_epoch, **last}


@contextmanager
def sharded_embedding(params: PipelineParams) -> Iterator[None]:
    """Embed large file lists on the Dask cluster of ``compute.dask_address`` ($SIAMESE_DASK_ADDRESS)
    inside the block, unless the caller (a flow, on its Dask task runner) already shards them."""
    from siamese_core import sharding

    with sharding.on_dask(sharding.dask_address(params.compute.dask_address), params.compute.shard_size,
                          params.compute.dask_connect_timeout):
        yield


def embed(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Embed the training images with the trained model into the bundle artifacts/bundle/."""
    from siamese_core.data import scan_folder
    from siamese_core.model import load_embedding
    from siamese_core.recognizer import MODEL_FILE, save_trained_bundle

    with sharded_embedding(params):
        gallery = save_trained_bundle(load_embedding(root / TRAINED / MODEL_FILE), scan_folder(params.data.train_dir),
                                      params.core(), root / BUNDLE, read_json(root / TRAINED / HISTORY_FILE)).gallery
    log.info("embed: gallery of %d images in %d classes", len(gallery), len(gallery.class_names))
    return {"gallery_size": len(gallery), "classes": len(gallery.class_names)}


def evaluate(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Score the bundle on the test folder against its gallery, beside two baselines.

    Says whether the model beats both baselines, calibrates the unknown-class threshold on classes left
    out of the gallery (``evaluate.open_set``) and, when ``data.heldout_dir`` is set, scores known vs
    held-out classes and few-shot enrolment of the held-out classes
    (for the baselines too). Writes metrics.json (flat figures), artifacts/evaluation.json
    (the whole report), plots/*.csv and the PNGs in plots/images/.
    """
    from siamese_core.data import scan_folder
    from siamese_core.evaluation import assess
    from siamese_core.metrics import flat_metrics
    from siamese_core.recognizer import SiameseRecognizer
    from siamese_core.report import write_plots

    recognizer = SiameseRecognizer.load(root / BUNDLE)
    recognizer.config = recognizer.config.model_copy(update={"evaluate": params.evaluate})
    heldout = scan_folder(params.data.heldout_dir) if params.data.heldout_dir else None
    with sharded_embedding(params):
        assessment = assess(recognizer, scan_folder(params.data.test_dir), scan_folder(params.data.train_dir),
                            heldout, seed=recognizer.config.train.seed)
    report = assessment.report
    history = read_json(root / TRAINED / HISTORY_FILE)["history"]
    loss, val_loss = history.get("loss", []), history.get("val_loss", [])
    write_csv(root / LOSS_PLOT, ["epoch", "loss", "val_loss"],
              [(i + 1, v, val_loss[i] if i < len(val_loss) else "") for i, v in enumerate(loss)])
    write_csv(root / PER_CLASS_PLOT, ["class", "accuracy", "precision"],
              [(name, accuracy, report["per_class_precision"][name])
               for name, accuracy in report["per_class_accuracy"].items()])
    labels, matrix = report["confusion_matrix"]["labels"], report["confusion_matrix"]["matrix"]
    write_csv(root / CONFUSION_PLOT, ["actual", "predicted"],
              [(labels[i], labels[j]) for i, row in enumerate(matrix) for j, n in enumerate(row) for _ in range(n)])
    with atomic_dir(root / IMAGE_PLOTS) as tmp:
        write_plots(assessment, recognizer.gallery, history, recognizer.input_size, tmp)
    write_json(root / EVALUATION, report)
    metrics = flat_metrics(report)
    write_json(root / METRICS, metrics)
    for note in report["notes"]:
        log.warning("evaluate: %s", note)
    check = report["baseline_check"]
    log.log(logging.INFO if check["passed"] else logging.WARNING, "evaluate: %s", check["sentence"])
    log.info("evaluate: top1 %.4f%s; %.1f ms per query with %d test-time view(s)", metrics["top1"], "".join(
        f", {k}-shot {metrics[f'fewshot.{k}shot.mean']:.4f}" for k in params.evaluate.fewshot_shots
        if f"fewshot.{k}shot.mean" in metrics), assessment.ms_per_query, params.evaluate.test_time_views)
    return metrics


def record_reused_training(run, root: Path) -> None:
    """Tag ``run`` with the run that trained the model in ``root`` and copy that training's curve into it."""
    run.set_tags({"training_run_id": read_json(root / TRAINED / RUN_FILE)["run_id"]})
    run.log_history(read_json(root / TRAINED / HISTORY_FILE)["history"])


def _pipeline_run(params: PipelineParams, root: Path):
    """The MLflow run the train stage opened, if it is still open; else a new run that records the reused training."""
    from .tracking import PipelineRun

    trained_by = read_json(root / TRAINED / RUN_FILE)["run_id"]
    try:
        run = PipelineRun(trained_by)
        if run.is_open:
            return run
    except Exception as exc:  # a run of another tracking store, or deleted since
        log.info("training run %s not found (%s): opening a new run", trained_by, exc)
    run = PipelineRun.start(params)
    record_reused_training(run, root)
    return run


def _report_header(params: PipelineParams, record: dict, versions: dict[str, str]) -> dict[str, str]:
    from .card import changed_params

    changed = ", ".join(f"{key}={value}" for key, (value, _) in sorted(changed_params(params).items()))
    return {
        "model version": f"{record['model_name']} version {record['version']} ({record['decision']})",
        "MLflow run": f"{record['run_name']} ({record['run_id']})",
        "data version (DVC md5)": ", ".join(f"{split} {digest}" for split, digest in versions.items()),
        "git commit": record["git_commit"],
        "params changed from the defaults": changed or "none",
    }


def register(params: PipelineParams, root: Path = Path("."), run=None) -> dict:
    """Log the evaluation to the pipeline's MLflow run, register the bundle behind the champion gate, end the run.

    The registered bundle carries the threshold calibrated by evaluate. The version's
    description is its model card. Writes artifacts/report.html (headed by the version, run,
    data version and params) and artifacts/registration.json, and tries the champion on one
    test image. Refuses to register when the data changed while the run was in progress.
    """
    import pandas as pd

    from siamese_core.data import scan_folder
    from siamese_core.recognizer import store_threshold
    from siamese_core.report import write_html

    from . import registry, tracking
    from .card import model_card
    from .pyfunc_model import encode_image

    run = run or _pipeline_run(params, root)
    with run.failing_on_error("register"):
        versions = tracking.data_versions(params)
        data = tracking.data_hash(params, versions)
        mlflow_run = run.client.get_run(run.run_id)
        started_on = mlflow_run.data.tags.get("data_hash")
        if started_on and started_on != data:
            raise DatasetError(f"the data changed while this run was in progress (from {started_on} to {data}): "
                               "its model may mix both versions, so it is not registered; run the pipeline again")
        history = read_json(root / TRAINED / HISTORY_FILE)["history"]
        evaluation = read_json(root / EVALUATION)
        metrics = {key: value for key, value in read_json(root / METRICS).items()
                   if not key.endswith(COUNT_KEYS)}  # counts stay in metrics.json; MLflow charts figures
        artifacts = [root / p for p in (TRIPLETS_SUMMARY, VALIDATION, VALIDATION_TEXT, EVALUATION, METRICS,
                                        IMAGE_PLOTS, LOSS_PLOT, PER_CLASS_PLOT, CONFUSION_PLOT)]
        run.client.log_table(run.run_id, {
            "class": list(evaluation["per_class_accuracy"]),
            **{key.removeprefix("per_class_"): list(evaluation[key].values()) for key in PER_CLASS_METRICS}},
            "per_class.json")
        profiles = tracking.data_profiles(params, versions)
        lineage = {"MLflow run": f"{mlflow_run.info.run_name} ({run.run_id})", **{
            key: value for key, value in mlflow_run.data.tags.items()
            if key in ("git_commit", "dvc.experiment", "prefect.flow_run_url", "training_run_id")}}

        def card(version, decision, previous, reason):
            return model_card(params, metrics, profiles, lineage, version, decision, previous, reason, evaluation)

        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / BUNDLE.name
            shutil.copytree(root / BUNDLE, bundle)
            if "calibration" in evaluation:
                store_threshold(bundle, evaluation["calibration"]["threshold"], evaluation["calibration"])
            result = registry.log_and_register(
                params, bundle, metrics, history, artifacts, {"data_hash": data}, run=run, card=card,
                score_champion=registry.same_queries_scorer(params.data.train_dir, params.data.test_dir,
                                                            params.register.metric),
                baselines=evaluation.get("baseline_check"))
    record = {**result, "git_commit": tracking.git_commit(), "data_hash": data, "data_versions": versions}
    from siamese_core.report import report_images

    write_html(root / REPORT, evaluation, report_images(root / IMAGE_PLOTS),
               title=f"{result['model_name']} version {result['version']}: evaluation on {params.data.test_dir}",
               header=_report_header(params, record, versions))
    run.log_artifact(root / REPORT)

    test = scan_folder(params.data.test_dir)
    champion = registry.load_champion(params.register.model_name)
    answer = champion.predict(pd.DataFrame({"image": [encode_image(test.paths[0])]})).iloc[0]
    sample = {"image": test.paths[0], "true_label": test.label_names[0],
              "label": answer["label"], "distance": float(answer["distance"])}
    record["sample_prediction"] = sample
    write_json(root / REGISTRATION, record)
    log.info("%s version %s is %s: %s", result["model_name"], result["version"], result["decision"], result["reason"])
    log.info("champion predicts %s (a '%s') as '%s' at distance %.4f",
             sample["image"], sample["true_label"], sample["label"], sample["distance"])
    return record


STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "validate": validate, "triplets": triplets, "train": train, "embed": embed, "evaluate": evaluate,
    "register": register,
}


def main(argv: list[str] | None = None) -> int:
    """Run one stage from the command line; a user error is one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.stages", description="Run one pipeline stage.")
    parser.add_argument("stage", choices=list(STAGE_FUNCTIONS))
    parser.add_argument("--params", help="params file (default: $SIAMESE_PARAMS or params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, value read as YAML; repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    terminate_as_interrupt()
    if args.stage != "validate":
        import_tensorflow_quietly()
    try:
        STAGE_FUNCTIONS[args.stage](load_params(args.params, parse_set_options(args.overrides)))
    except PIPELINE_USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the stage's previous outputs are untouched", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
