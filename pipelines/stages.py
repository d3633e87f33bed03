"""The pipeline stages: one implementation, run by ``dvc repro`` and by the Prefect flows.

Each stage reads only what dvc.yaml declares for it (the ``STAGES`` table says the
same) and writes its outputs atomically, at fixed paths relative to the project
root, the current directory. Run one stage with
``python -m pipelines.stages <stage> [--params params.yaml] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siamese_core.config import parse_set_options
from siamese_core.errors import ConfigError, DatasetError
from siamese_core.io import atomic_dir, atomic_path

from .errors import PIPELINE_USER_ERRORS
from .params import PipelineParams, load_params
from .process import import_tensorflow_quietly, terminate_as_interrupt

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is imported later, by the stages that need it

ARTIFACTS = Path("artifacts")
VALIDATION = ARTIFACTS / "validation.json"
VALIDATION_TEXT = ARTIFACTS / "validation.txt"
TRIPLETS = ARTIFACTS / "triplets.csv"
TRIPLETS_SUMMARY = ARTIFACTS / "triplets_summary.json"
TRAINED = ARTIFACTS / "train"
BUNDLE = ARTIFACTS / "bundle"
EVALUATION = ARTIFACTS / "evaluation.json"
REGISTRATION = ARTIFACTS / "registration.json"
METRICS = Path("metrics.json")
LOSS_PLOT = Path("plots/loss.csv")
PER_CLASS_PLOT = Path("plots/per_class.csv")
CONFUSION_PLOT = Path("plots/confusion.csv")
IMAGE_PLOTS = Path("plots/images")
REPORT = ARTIFACTS / "report.html"
MODEL_FILE, HISTORY_FILE = "model.keras", "history.json"
PER_CLASS_METRICS = ("per_class_accuracy", "per_class_precision", "per_class_recall")
TRAIN_DIR, TEST_DIR = "${data.train_dir}", "${data.test_dir}"

log = logging.getLogger("pipelines.stages")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, header: list[str], rows) -> None:
    """Write a CSV table atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def content_hash(path: str | os.PathLike) -> str:
    """DVC's md5 of a file, or of a folder (``<md5>.dir``, the value dvc.lock records); "missing" if absent.

    ``__pycache__`` folders and ``.pyc`` files are left out, as .dvcignore leaves them out.
    """
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    path = Path(path)
    if path.is_file():
        return file_md5(str(path))
    if not path.is_dir():
        return "missing"
    tree = Tree()
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".pyc"):
                file = Path(root, name)
                tree.add(file.relative_to(path).parts, None, HashInfo("md5", file_md5(str(file))))
    tree.digest()
    return tree.hash_info.value


def data_hash(params: PipelineParams) -> str:
    """``<train md5>+<test md5>``: the content of the data folders, as DVC hashes them."""
    return f"{content_hash(params.data.train_dir)}+{content_hash(params.data.test_dir)}"


def git_commit() -> str:
    """The checked-out git commit, or "unknown" outside a git repository."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def param_value(params: PipelineParams, key: str) -> Any:
    """The value of a dotted params key (``train.epochs``, or a whole section ``train``), JSON-ready."""
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def resolve(template: str, params: PipelineParams) -> Path:
    """A dvc.yaml path with its ``${section.key}`` references filled in from the params."""
    return Path(re.sub(r"\$\{([\w.]+)\}", lambda m: str(param_value(params, m.group(1))), template))


def prepare(params: PipelineParams) -> dict:
    """Write the demo dataset into ``data.train_dir`` / ``data.test_dir``, or keep the data there ('none')."""
    data = params.data
    if data.prepare_source == "none":
        missing = [d for d in (data.train_dir, data.test_dir) if not Path(d).is_dir()]
        if missing:
            raise DatasetError(f"data.prepare_source is 'none' but {', '.join(missing)} does not exist")
        return {"source": "none"}
    if data.prepare_source != "digits":
        raise ConfigError(f"data.prepare_source: unknown source '{data.prepare_source}', expected 'digits' or 'none'")
    from .prepare import write_digits

    counts = write_digits(
        data.train_dir, data.test_dir, data.prepare_image_size, data.prepare_test_fraction,
        data.prepare_seed, data.prepare_per_class,
    )
    log.info("prepare: wrote %(train)d training and %(test)d test digits", counts)
    return {"source": "digits", **counts}


def validate(params: PipelineParams) -> dict:
    """Check the train/test folders; write artifacts/validation.json and .txt; raise on errors.

    Warnings are reported and the pipeline goes on; a failed validation is also logged
    to MLflow as a FAILED run carrying the report.
    """
    from siamese_core.validation import validate_dataset

    data = params.data
    report = validate_dataset(data.train_dir, data.test_dir, open_set=data.open_set, strict=data.strict)
    write_json(VALIDATION, report.to_dict())
    with atomic_path(VALIDATION_TEXT) as tmp:
        tmp.write_text(report.text(max_paths=50) + "\n", encoding="utf-8")
    log.info("%s", report.text())
    if not report.ok:
        from . import tracking

        tracking.log_failed_stage(params, "validate", [VALIDATION, VALIDATION_TEXT])
        codes = ", ".join(sorted({f.code for f in report.errors}))
        raise DatasetError(
            f"dataset validation failed with {len(report.errors)} errors ({codes}): "
            f"{report.errors[0].message}; full report in {VALIDATION_TEXT}"
        )
    splits = report.summary["splits"]
    return {"train": splits["train"]["images"], "test": splits["test"]["images"],
            "classes": splits["train"]["classes"], "warnings": len(report.warnings)}


def triplets(params: PipelineParams) -> dict:
    """Mine the training triplets into artifacts/triplets.csv, with a summary JSON."""
    from siamese_core.data import scan_folder
    from siamese_core.train import mine_triplets
    from siamese_core.triplets import save_triplets

    table = mine_triplets(params.core(), scan_folder(params.data.train_dir))
    save_triplets(table, TRIPLETS)
    summary = {
        "strategy": params.triplets.strategy,
        "max_pairs_per_class": params.triplets.max_pairs_per_class,
        "triplets": len(table),
        "per_class": {name: int(n) for name, n in table["anchor_class"].value_counts().sort_index().items()},
    }
    write_json(TRIPLETS_SUMMARY, summary)
    log.info("triplets: %d (%s)", len(table), params.triplets.strategy)
    return {"triplets": len(table), "strategy": params.triplets.strategy}


def train(params: PipelineParams) -> dict:
    """Train on the triplet table; write artifacts/train/ (model.keras, history.json) atomically."""
    from siamese_core.train import train as fit
    from siamese_core.triplets import load_triplets

    result = fit(params.core(), params.data.train_dir, params.data.test_dir, triplets=load_triplets(TRIPLETS),
                 verbose=2, heldout_dir=params.data.heldout_dir)
    with atomic_dir(TRAINED) as tmp:
        result.embedding.save(tmp / MODEL_FILE)
        history = {"best_epoch": result.best_epoch, "history": result.history}
        (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    last = {key: values[-1] for key, values in result.history.items()}
    log.info("train: best epoch %d, last epoch %s", result.best_epoch, last)
    return {"best_epoch": result.best_epoch, **last}


def embed(params: PipelineParams) -> dict:
    """Embed the training images with the trained model into the bundle artifacts/bundle/."""
    import keras

    from siamese_core import model as _registers_custom_layers  # noqa: F401
    from siamese_core.data import scan_folder
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    embedding = keras.saving.load_model(TRAINED / MODEL_FILE, compile=False, safe_mode=True)
    gallery = build_gallery(embedding, scan_folder(params.data.train_dir), params.evaluate.embed_batch_size)
    trained = read_json(TRAINED / HISTORY_FILE)
    SiameseRecognizer(embedding, gallery, params.core()).save(BUNDLE, trained)
    log.info("embed: gallery of %d images in %d classes", len(gallery), len(gallery.class_names))
    return {"gallery_size": len(gallery), "classes": len(gallery.class_names)}


def evaluate(params: PipelineParams) -> dict:
    """Score the bundle on the test folder against its gallery, beside two baselines.

    Calibrates the unknown-class threshold on the test queries and, when ``data.heldout_dir``
    is set, scores known vs held-out classes and few-shot enrolment of the held-out classes.
    Writes metrics.json (flat figures), artifacts/evaluation.json (the whole report),
    plots/*.csv, the PNGs in plots/images/ and artifacts/report.html.
    """
    from siamese_core.data import scan_folder
    from siamese_core.metrics import assess, flat_metrics
    from siamese_core.recognizer import SiameseRecognizer
    from siamese_core.report import write_html, write_plots

    recognizer = SiameseRecognizer.load(BUNDLE)
    recognizer.config = recognizer.config.model_copy(update={"evaluate": params.evaluate})
    heldout = scan_folder(params.data.heldout_dir) if params.data.heldout_dir else None
    assessment = assess(recognizer, scan_folder(params.data.test_dir), scan_folder(params.data.train_dir), heldout,
                        seed=recognizer.config.train.seed)
    report = assessment.report
    history = read_json(TRAINED / HISTORY_FILE)["history"]
    loss, val_loss = history.get("loss", []), history.get("val_loss", [])
    write_csv(LOSS_PLOT, ["epoch", "loss", "val_loss"],
              [(i + 1, v, val_loss[i] if i < len(val_loss) else "") for i, v in enumerate(loss)])
    write_csv(PER_CLASS_PLOT, ["class", "accuracy", "precision"],
              [(name, accuracy, report["per_class_precision"][name])
               for name, accuracy in report["per_class_accuracy"].items()])
    labels, matrix = report["confusion_matrix"]["labels"], report["confusion_matrix"]["matrix"]
    write_csv(CONFUSION_PLOT, ["actual", "predicted"],
              [(labels[i], labels[j]) for i, row in enumerate(matrix) for j, n in enumerate(row) for _ in range(n)])
    with atomic_dir(IMAGE_PLOTS) as tmp:
        images = write_plots(assessment, recognizer.gallery, history, recognizer.input_size, tmp)
    images = {title: IMAGE_PLOTS / path.name for title, path in images.items()}
    write_html(REPORT, report, images, title=f"Evaluation on {params.data.test_dir}")
    write_json(EVALUATION, report)
    metrics = flat_metrics(report)
    write_json(METRICS, metrics)
    for note in report["notes"]:
        log.warning("evaluate: %s", note)
    log.info("evaluate: %s", metrics)
    return metrics


def register(params: PipelineParams) -> dict:
    """Log the run to MLflow, register the bundle (champion gate), and try the champion on one test image.

    The registered bundle is artifacts/bundle with the threshold calibrated by evaluate in its metadata.
    Logged metrics: every figure of metrics.json, and per-class accuracy, precision and recall.
    """
    import pandas as pd

    from siamese_core.data import scan_folder
    from siamese_core.recognizer import store_threshold

    from . import tracking
    from .pyfunc_model import encode_image

    history = read_json(TRAINED / HISTORY_FILE)["history"]
    tags = {"git_commit": git_commit(), "data_hash": data_hash(params)}
    artifacts = [TRIPLETS_SUMMARY, VALIDATION, VALIDATION_TEXT, EVALUATION, METRICS, REPORT, IMAGE_PLOTS,
                 LOSS_PLOT, PER_CLASS_PLOT, CONFUSION_PLOT]
    evaluation = read_json(EVALUATION)
    metrics = {**read_json(METRICS), **{key: evaluation[key] for key in PER_CLASS_METRICS}}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / BUNDLE.name
        shutil.copytree(BUNDLE, bundle)
        if "calibration" in evaluation:
            store_threshold(bundle, evaluation["calibration"]["threshold"], evaluation["calibration"])
        result = tracking.log_and_register(params, bundle, metrics, history, artifacts, tags)

    test = scan_folder(params.data.test_dir)
    champion = tracking.load_champion(params.register.model_name)
    answer = champion.predict(pd.DataFrame({"image": [encode_image(test.paths[0])]})).iloc[0]
    sample = {"image": test.paths[0], "true_label": test.label_names[0],
              "label": answer["label"], "distance": float(answer["distance"])}
    record = {**result, **tags, "sample_prediction": sample}
    write_json(REGISTRATION, record)
    print(f"{result['model_name']} version {result['version']} is {result['decision']}: "
          f"{result['metric']} {result['value']:.4f} (previous champion {result['previous_champion_value']})")
    print(f"champion predicts {sample['image']} (a '{sample['true_label']}') as '{sample['label']}' "
          f"at distance {sample['distance']:.4f}")
    return record


@dataclass(frozen=True)
class Stage:
    """A stage function and what it declares in dvc.yaml: data inputs, params keys and outputs.

    Paths may hold ``${section.key}`` references, as dvc.yaml does; code dependencies are left out.
    """

    run: Callable[[PipelineParams], dict]
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]

    def dep_paths(self, params: PipelineParams) -> list[Path]:
        return [resolve(dep, params) for dep in self.deps]

    def out_paths(self, params: PipelineParams) -> list[Path]:
        return [resolve(out, params) for out in self.outs]


_PLOTS = (str(LOSS_PLOT), str(PER_CLASS_PLOT), str(CONFUSION_PLOT))
_EVALUATION_OUTS = (str(METRICS), str(EVALUATION), str(REPORT), str(IMAGE_PLOTS), *_PLOTS)
STAGES: dict[str, Stage] = {
    "prepare": Stage(
        prepare,
        (),
        ("data.train_dir", "data.test_dir", "data.prepare_source", "data.prepare_test_fraction",
         "data.prepare_image_size", "data.prepare_seed", "data.prepare_per_class"),
        (TRAIN_DIR, TEST_DIR),
    ),
    "validate": Stage(
        validate,
        (TRAIN_DIR, TEST_DIR),
        ("data.train_dir", "data.test_dir", "data.open_set", "data.strict"),
        (str(VALIDATION), str(VALIDATION_TEXT)),
    ),
    "triplets": Stage(
        triplets,
        (TRAIN_DIR, str(VALIDATION)),
        ("preset", "data.train_dir", "model", "triplets", "train.seed", "evaluate.embed_batch_size"),
        (str(TRIPLETS), str(TRIPLETS_SUMMARY)),
    ),
    "train": Stage(
        train,
        (TRAIN_DIR, TEST_DIR, str(TRIPLETS)),
        ("preset", "data.train_dir", "data.test_dir", "data.heldout_dir", "model", "train", "evaluate.fewshot_way"),
        (str(TRAINED),),
    ),
    "embed": Stage(
        embed,
        (TRAIN_DIR, str(TRAINED)),
        ("preset", "data.train_dir", "model", "triplets", "train", "evaluate"),
        (str(BUNDLE),),
    ),
    "evaluate": Stage(
        evaluate,
        (TRAIN_DIR, TEST_DIR, str(BUNDLE), str(TRAINED)),
        ("preset", "data.train_dir", "data.test_dir", "data.heldout_dir", "evaluate"),
        _EVALUATION_OUTS,
    ),
    "register": Stage(
        register,
        (TRAIN_DIR, TEST_DIR, str(BUNDLE), str(TRAINED), str(TRIPLETS_SUMMARY), str(VALIDATION),
         str(VALIDATION_TEXT), *_EVALUATION_OUTS),
        ("data.train_dir", "data.test_dir", "register"),
        (str(REGISTRATION),),
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Run one stage from the command line; a user error is one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.stages", description="Run one pipeline stage.")
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", help="params file (default: $SIAMESE_PARAMS or params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, value read as YAML; repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    terminate_as_interrupt()
    if args.stage not in ("prepare", "validate"):
        import_tensorflow_quietly()
    try:
        STAGES[args.stage].run(load_params(args.params, parse_set_options(args.overrides)))
    except PIPELINE_USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the stage's previous outputs are untouched", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
