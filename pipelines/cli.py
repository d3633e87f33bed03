"""The ``siamese`` command line: train, predict, evaluate, enrol; the pipeline's stages and flows;
the registry and the stack. Every command runs through one error boundary (:func:`pipelines.process.guarded`).

TensorFlow is imported inside the commands, so ``siamese --help`` answers at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import psutil
import typer
from filelock import FileLock, Timeout

from pipelines import pipeline
from pipelines.demo_data import write_demo_data
from pipelines.feedback import import_feedback
from pipelines.inference_log import judged, open_log
from pipelines.labelstudio import LabelStudio, pull_labels, push_review
from pipelines.params import DataConfig, PipelineParams, library_config, load_params
from pipelines.process import existing, import_tensorflow_quietly, quiet_libraries, showing_progress
from pipelines.process import fail as _fail
from pipelines.process import guarded as _run
from pipelines.supervisor import MLFLOW_SERVER_DEFAULTS, bind_problem
from pipelines.supervisor import stop as stop_group
from siamese_core import sharding
from siamese_core.config import parse_set_options
from siamese_core.data import scan_folder
from siamese_core.errors import BundleError, ConfigError, DatasetError
from siamese_core.evaluation_report import summary
from siamese_core.io import ensure_writable
from siamese_core.validation import validate_folder

app = typer.Typer(
    help="Siamese triplet-loss image recogniser: train on class folders, recognise new images "
    "by their nearest gallery class.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a config key, value read as YAML; repeatable. "
        "Bare or dotted keys: --set weights=null --set model.margin=0.2 --set train.epochs=3.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DaskOption = Annotated[str | None, typer.Option(
    "--dask-address", help="Embed large image sets in shards on this Dask scheduler (tcp://host:8786); "
    "default $SIAMESE_DASK_ADDRESS, else in this process.")]
ParamsOption = Annotated[Path | None, typer.Option(
    "--params", help="The params file (default: $SIAMESE_PARAMS, else params.yaml).")]


def _check_model(model: str) -> None:
    """A local bundle path must be a folder (a registry URI is checked when it is downloaded)."""

    if not model.startswith("models:/") and not Path(model).is_dir():
        raise BundleError.not_a_folder(model)


def _bundle_path(model: str) -> Path:
    """A local bundle folder, downloading it from the MLflow registry for a ``models:/`` URI."""
    if not model.startswith("models:/"):
        return Path(model)
    from pipelines.registry import download_bundle  # lazy: MLflow loads in seconds

    return download_bundle(model)


def _check_dataset(train_dir: Path, test_dir: Path, params: Path | None) -> None:
    """The pipeline's validation before training: every problem in one error, warnings shown and passed.

    With a params file, its ``data`` section sets the levels and limits, as in the validate stage.
    """

    report = (load_params(params).data if params else DataConfig()).validation(train_dir, test_dir)
    _refuse_or_warn(report, f"dataset validation failed with {len(report.errors)} errors "
                            f"and {len(report.warnings)} warnings")


def _check_gallery_folder(folder: Path) -> None:
    """The checks a training folder gets, for a folder to enrol or search: every problem in one error."""

    report = validate_folder(folder)
    _refuse_or_warn(report, f"{folder}: {len(report.errors)} problems, nothing was enrolled or searched")


def _refuse_or_warn(report, headline: str) -> None:
    """A DatasetError with ``headline`` and the report when it has errors; else its warnings on stderr."""

    if not report.ok:
        raise DatasetError(f"{headline}:\n{report.text(max_paths=20)}")
    for finding in report.warnings:
        typer.secho(f"warning [{finding.code}] {finding.message}", fg=typer.colors.YELLOW, err=True)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    """Siamese recogniser command line."""
    quiet_libraries()


@app.command()
def train(
    train_dir: Annotated[Path, typer.Option("--train", help="Training folder: <dir>/<class>/<image>.")],
    test_dir: Annotated[Path, typer.Option("--test", help="Test folder of the same shape (validation triplets).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write (replaced atomically).")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs.")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="A params.yaml to start from.")] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", help="By kind of data: greyscale drawings, characters, symbols: fast-cpu (small CNN, online "
                         "mining); the same or faces, with classes enrolled later from one or a few images: "
                         "fewshot-cpu; colour photos (places, products, objects): photos-cpu (EfficientNet-Lite0, "
                         "ImageNet weights installed with the project, offline); the original recipe, for a GPU: "
                         "seed (ResNet50, ImageNet weights from Keras' cache). Without --preset or --params: the "
                         "seed's model, which needs those weights (--set model.weights=null trains it from "
                         "scratch).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last epoch.")] = False,
    set_: SetOption = None,
) -> None:
    """Train a Siamese network and save a bundle (model, gallery of the training images, config).

    Each epoch is checkpointed beside the bundle (.<out>.checkpoint) until the bundle is written.
    """

    settings = {}

    def check():

        extra = [*(set_ or []), *([f"train.epochs={epochs}"] if epochs else [])]
        settings["config"] = library_config(params, preset, extra)
        existing(train_dir, "--train", "folder")
        existing(test_dir, "--test", "folder")

    def body():


        from siamese_core.distribute import is_chief, worker_slice  # lazy: TensorFlow
        from siamese_core.evaluation import check_baselines  # lazy: TensorFlow
        from siamese_core.recognizer import SiameseRecognizer, save_trained_bundle  # lazy: TensorFlow
        from siamese_core.train import train as run_training  # lazy: TensorFlow

        config = settings["config"]
        progress = 1 if sys.stdout.isatty() else 2  # a pipe gets one plain line per epoch, no bars
        _check_dataset(train_dir, test_dir, params)
        checkpoint = out.parent / f".{out.name}.checkpoint"
        if config.train.distribute == "multi_worker" and not is_chief():  # the chief writes; this one trains
            result = run_training(config, train_dir, test_dir, checkpoint_dir=checkpoint, resume=resume, verbose=progress)
            worker, workers = worker_slice()
            typer.echo(f"worker {worker} of {workers}: trained {len(result.history.get('loss', []))} epochs; "
                       f"the chief writes {out}")
            return
        ensure_writable(out.parent, "the bundle and its checkpoints")
        try:  # one training per bundle path: the checkpoint and the bundle are its alone
            lock = _bundle_lock(out, timeout=0).acquire()
        except Timeout:
            raise ConfigError(f"{out}: another 'siamese train' is writing this bundle; wait for it or choose "
                              "another --out") from None
        with lock:
            result = run_training(config, train_dir, test_dir, checkpoint_dir=checkpoint, resume=resume, verbose=progress)
            save_trained_bundle(result.embedding, result.train_folder, config, out,
                                {"history": result.history, "best_epoch": result.best_epoch}, progress=True)
            shutil.rmtree(checkpoint, ignore_errors=True)
        last = ", ".join(f"{key} {values[-1]:.4g}" for key, values in result.history.items())
        typer.echo(f"saved {out}: kept the weights of epoch {result.best_epoch} ({result.kept_because}); "
                   f"last epoch: {last}")
        typer.echo(check_baselines(SiameseRecognizer.load(out), result.train_folder, scan_folder(test_dir)).sentence)

    _run(body, check=check)


@app.command()
def tune(
    train_dir: Annotated[Path, typer.Option("--train", help="Training folder: <dir>/<class>/<image>. Trials train "
                                            "and validate on a split of it alone.")],
    minutes: Annotated[float, typer.Option("--minutes", min=0.1, help="Wall-clock budget of the search; a trial "
                                           "still running when it ends stops at its next epoch.")],
    out: Annotated[Path, typer.Option("--out", help="Params file to write with the winning settings (for siamese "
                                      "train --params, or as params.yaml for dvc exp run and the pipeline).")],
    test_dir: Annotated[Path | None, typer.Option("--test", help="Test folder: scores the winner only, at the end.")] = None,
    heldout_dir: Annotated[Path | None, typer.Option(
        "--heldout", help="Classes never trained on: scores the winner's 1-shot accuracy only, at the end.")] = None,
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="Finished trials the study holds at most "
                                               "(those of an earlier, stopped session count).")] = None,
    dask_address: Annotated[str | None, typer.Option(
        "--dask-address", help="Run each round's trials side by side on this Dask scheduler (tcp://host:8786).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Trials asked per round: side by side on Dask, "
                                          "one after another without; the same number gives the same trials.")] = 2,
    params: ParamsOption = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Pin a config key (not searched), value read as YAML; repeatable.")] = None,
) -> None:
    """Search the settings that score best on your training folder within --minutes (Optuna), every trial a
    nested MLflow run; write the winner as a params file and compare it with the presets.

    Running the same command again resumes the study (its storage is optuna.db beside MLflow's database).
    """

    def check():

        settings["pins"] = parse_set_options(set_ or [])
        existing(train_dir, "--train", "folder")
        for folder, name in ((test_dir, "--test"), (heldout_dir, "--heldout")):
            if folder is not None:
                existing(folder, name, "folder")

    def body():
        from pipelines.tuning import StudyInterrupted, summary_text  # lazy: Optuna and MLflow load in seconds
        from pipelines.tuning import tune as run_study  # lazy: Optuna and MLflow load in seconds

        try:
            result = run_study(train_dir, out, minutes, trials, test_dir, heldout_dir, params, settings["pins"],
                               dask_address, parallel=parallel, progress=sys.stderr.isatty())
        except StudyInterrupted as stopped:  # what was kept and how to resume, instead of the generic line
            _fail(str(stopped), 130)
        typer.echo(summary_text(result))

    settings: dict = {}
    _run(body, tensorflow=False, check=check)  # trials load TensorFlow in their own process


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to recognise.")],
    model: Annotated[str, typer.Option(
        "--model", help="Bundle folder written by 'siamese train', or a registry URI such as models:/NAME@champion.")],
    gallery: Annotated[Path | None, typer.Option("--gallery", help="Use this class folder as the gallery.")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", min=1, help="Number of nearest classes to list (default: the bundle's evaluate.top_k).")] = None,
    as_json: JsonOption = False,
    log: Annotated[bool, typer.Option(
        "--log", help="Also write each answer to the inference log of params.yaml's monitoring section.")] = False,
    params: ParamsOption = None,
) -> None:
    """Recognise images: the nearest gallery class and its squared distance (and, when the bundle rejects
    unknown classes, the unknown score; above the threshold the class is 'unknown')."""

    def body():
        from pipelines.registry import model_identity  # lazy: MLflow loads in seconds
        from siamese_core.recognizer import SiameseRecognizer  # lazy: TensorFlow

        if gallery is not None:
            _check_gallery_folder(gallery)
        recognizer = SiameseRecognizer.load(_bundle_path(model))
        if gallery is not None:
            recognizer = recognizer.with_gallery(gallery, progress=True)
        inference_log = open_log(_monitoring(params), model_identity(model), "cli") if log else None
        started = time.perf_counter()
        queries = recognizer.embed([str(p) for p in images])
        matches = recognizer.match(queries, top_k=top_k)
        if inference_log is not None:
            latency_ms = 1000 * (time.perf_counter() - started)
            inference_log.submit([p.read_bytes() for p in images], matches, judged(recognizer, queries, matches),
                                 queries, latency_ms)
            inference_log.close()
        if as_json:
            typer.echo(json.dumps([{"image": str(p), **m.to_dict()} for p, m in zip(images, matches)], ensure_ascii=False))
            return
        for path, match in zip(images, matches):
            others = ", ".join(f"{label} {d:.4f}" for label, d in match.top_k[1:])
            score = "" if match.unknown_score is None else f"\tunknown score {match.unknown_score:.4g}"
            typer.echo(f"{path}\t{match.label}\t{match.distance:.4f}{score}" + (f"\t(next: {others})" if others else ""))

    def check():
        _check_model(model)
        for image in images:
            existing(image, "IMAGES", "file")
        if log and _monitoring(params).log_location() is None:

            raise ConfigError("--log: monitoring.log_uri is null in the params file; set a folder or s3:// URI")
        if gallery is not None:
            existing(gallery, "--gallery", "folder")

    _run(body, check=check)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(
        "--model", help="Bundle folder written by 'siamese train', or a registry URI such as models:/NAME@champion.")],
    test_dir: Annotated[Path, typer.Option("--test", help="Test folder: <dir>/<class>/<image>.")],
    heldout_dir: Annotated[Path | None, typer.Option(
        "--heldout", help="Classes never trained on: adds the open-set (unknown class) and few-shot figures.")] = None,
    unknown_dir: Annotated[Path | None, typer.Option(
        "--unknown", help="Images of no known class, in sub-folders as the others (unknown/<kind>/<image>): "
        "unknowns in every fold of the threshold's calibration.")] = None,
    baselines: Annotated[bool, typer.Option(
        "--baselines/--no-baselines", help="Also score raw pixels and the untrained network on the same gallery.")
    ] = True,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", min=1, help="k for top-k accuracy (default: the bundle's evaluate.top_k).")] = None,
    dask_address: DaskOption = None,
    as_json: JsonOption = False,
) -> None:
    """Score a bundle on a test folder as the pipeline's evaluate stage does.

    Top-1, top-k, MAP@R and per-class accuracy; the unknown-class threshold with cross-fitted
    figures; the raw-pixel and untrained-network baselines on the bundle's gallery images;
    with --heldout, known against unknown classes and few-shot enrolment of the held-out classes.
    """

    def body():
        from siamese_core.evaluation import assess_bundle  # lazy: TensorFlow
        from siamese_core.recognizer import SiameseRecognizer  # lazy: TensorFlow

        with sharding.on_dask(sharding.dask_address(dask_address)) as sharder, \
                showing_progress("siamese_core.evaluation"):
            recognizer = SiameseRecognizer.load(_bundle_path(model), sharder).with_settings(
                baselines=baselines, **({"top_k": top_k} if top_k else {}))
            result = assess_bundle(recognizer, scan_folder(test_dir), scan_folder(heldout_dir) if heldout_dir else None,
                                   scan_folder(unknown_dir) if unknown_dir else None)
        settings = recognizer.config.evaluate
        if as_json:
            typer.echo(json.dumps(result.report.to_dict(), ensure_ascii=False))
            return
        typer.echo(_evaluation_text(result.report))
        typer.echo(f"query time           {result.ms_per_query:.1f} ms per image on this machine, with "
                   f"{_views(settings.test_time_views)} and match {settings.match}")

    def check():
        _check_model(model)
        existing(test_dir, "--test", "folder")
        for folder, argument in ((heldout_dir, "--heldout"), (unknown_dir, "--unknown")):
            if folder is not None:
                existing(folder, argument, "folder")

    _run(body, check=check)


def _views(count: int) -> str:
    return "no test-time views" if count == 1 else f"{count} test-time views (one forward pass each)"


def _evaluation_text(report) -> str:
    """An :class:`~siamese_core.evaluation_report.EvaluationReport` as the lines a person reads: figures,
    baselines, threshold, held-out classes."""

    def figures(scores) -> str:
        return "  ".join(f"{key} {value:.4f}" for key, value in summary(scores).items() if key != "macro_precision")

    baselines = {"raw pixels": report.baseline_raw_pixels, "untrained": report.baseline_untrained}
    lines = [f"model                {figures(report)}  ({report.n_queries} images)"]
    lines.extend(f"{name:<21}{figures(scores)}" for name, scores in baselines.items() if scores is not None)
    if report.calibration is not None:
        c = report.calibration
        lines.append(f"unknown classes      score {c.score} above {c.threshold:.4g} is unknown; cross-fitted on "
                     f"classes left out of the gallery: known accepted {c.known_accepted:.4f}, unknown rejected "
                     f"{c.unknown_rejected:.4f}, AUROC {c.auroc:.4f}; target {'met' if c.target_met else 'missed'}")
    if report.open_set is not None:
        o = report.open_set
        lines.append(f"held-out classes     AUROC {o.auroc:.4f}, unknown rejected {o.unknown_rejected:.4f}, "
                     f"known accepted {o.known_accepted:.4f}, accuracy with rejection {o.accuracy_with_rejection:.4f}")
    for shots, result in (report.fewshot or {}).items():
        others = "".join(f", {name} {scores.fewshot[shots].mean:.4f}" for name, scores in baselines.items()
                         if scores is not None and scores.fewshot and shots in scores.fewshot)
        label = f"{result.n_way}-way {result.k_shot}-shot"
        lines.append(f"{label:<21}{result.mean:.4f} ± {result.ci95:.4f}{others}")
    lines.extend(f"note: {note}" for note in report.notes)
    lines.append(report.baseline_check.sentence)
    lines.append("per class:")
    lines.extend(f"  {name}\t{accuracy:.4f}" for name, accuracy in report.per_class_accuracy.items())
    return "\n".join(lines)


def _bundle_lock(bundle: Path, timeout: float):
    """The lock of a bundle folder: one writer at a time among this machine's processes ('siamese train' and
    'siamese enroll' take it). It lives in the temporary folder, keyed by the bundle's path, so the bundle's
    folder holds nothing but bundles."""


    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"siamese-bundle-{key}.lock", timeout=timeout)


@app.command()
def enroll(
    folder: Annotated[Path, typer.Argument(help="Class folder(s) to add: <dir>/<class>/<image>.")],
    model: Annotated[str, typer.Option(
        "--model", help="Bundle folder to extend, or a registry URI: models:/NAME@ALIAS or models:/NAME/VERSION.")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Bundle only: write the enlarged bundle here (default: in place).")] = None,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Registry only: make the new version the champion, or with register.rollout shadow or "
        "canary the challenger of a new rollout; refused while a rollout is live (default: alias 'enrolled').")] = False,
    dask_address: DaskOption = None,
    params: ParamsOption = None,
) -> None:
    """Add classes or images to a gallery without retraining.

    A bundle folder is extended in place or written to --out. A registry model gets a new
    version with the enlarged gallery and the same network, tagged enrolled_from=<version>;
    it takes the alias 'enrolled', or with --promote goes the way register.rollout sets:
    'champion' (direct), or 'challenger' of a new shadow or canary rollout.
    """

    def body():

        with sharding.on_dask(sharding.dask_address(dask_address)) as sharder:
            enrol(sharder)

    def enrol(sharder):
        _check_gallery_folder(folder)
        if model.startswith("models:/"):
            if out is not None:
                _fail("--out is for a bundle folder; a registry model gets a new version instead")
            from pipelines.enrolment import enroll_and_register  # lazy: TensorFlow

            name, _, source = model.removeprefix("models:/").partition("@")
            if not source:
                name, _, source = name.partition("/")
            result = enroll_and_register(name, folder, source or "champion", promote, sharder,
                                         _settings(params).register)
            typer.echo(f"{name} version {result['version']} ({result['alias']}), enrolled from version "
                       f"{result['enrolled_from']}: gallery of {result['gallery_size']} images, "
                       f"new classes {result['new_classes']}")
            if result["rollout"]:
                typer.echo(f"in {result['rollout']} rollout: `siamese rollout status` shows its live evidence, "
                           "`siamese promote` makes it champion")
            return
        if promote:
            _fail("--promote is for a registry model (models:/NAME@ALIAS)")
        from siamese_core.recognizer import SiameseRecognizer  # lazy: TensorFlow

        with _bundle_lock(Path(out or model), timeout=-1):  # another enrolment into it finishes first, then this one
            recognizer = SiameseRecognizer.load(model, sharder)
            before, start = len(recognizer.gallery), time.perf_counter()
            recognizer.enroll(folder)
            ms = (time.perf_counter() - start) * 1000 / max(1, len(recognizer.gallery) - before)
            recognizer.save(out or model)
        typer.echo(f"gallery now {len(recognizer.gallery)} images in {len(recognizer.gallery.class_names)} classes; "
                   f"enrolling took {ms:.1f} ms per image with {_views(recognizer.config.evaluate.test_time_views)}")

    def check():
        existing(folder, "FOLDER", "folder")
        if not model.startswith("models:/"):
            _check_model(model)

    _run(body, check=check)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="Folder to write train/, test/ and heldout/ into.")] = Path("data/demo"),
    dvc_add: Annotated[bool, typer.Option("--dvc-add/--no-dvc-add", help="Track the folder with 'dvc add'.")] = True,
) -> None:
    """Write the demo dataset once (a slice of Omniglot, MIT licence) and track it with DVC.

    Known classes are split into train/ and test/; the held-out classes in heldout/ are never
    trained on and show few-shot recognition. The files are the same on every machine, so a
    fresh clone gets the data version its data/demo.dvc records.
    """

    def body():


        if out.is_dir() and any(out.iterdir()):
            typer.echo(f"{out} already holds data; nothing written")
        else:
            counts = write_demo_data(out)
            typer.echo(f"wrote {counts['train']} train, {counts['test']} test and {counts['heldout']} held-out images "
                       f"({counts['known_classes']} known, {counts['heldout_classes']} held-out classes) to {out}")
        if dvc_add and Path(".dvc").is_dir():
            subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(out)], check=True)
            typer.echo(f"tracked by DVC: {out}.dvc (commit it; 'dvc push' uploads the data)")

    _run(body)


ReasonOption = Annotated[str, typer.Option("--reason", help="Why: recorded on the version with your user name and the time.")]


@app.command()
def promote(
    model_name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make the champion.")],
    reason: ReasonOption,
    force: Annotated[bool, typer.Option(
        "--force", help="In shadow or canary mode, promote without the live evidence register.promote_* asks for "
        "(recorded on the version).")] = False,
    params: ParamsOption = None,
) -> None:
    """Make a version the champion by hand, without the gate; the old champion becomes 'previous'.

    With register.rollout shadow or canary, the version must be the live challenger with enough live evidence
    (`siamese rollout status`); the evidence is recorded on the version and the rollout ends."""

    def body():
        from pipelines.registry import set_champion  # lazy: MLflow loads in seconds

        done = set_champion(model_name, version, reason, rollout_mode=_settings(params).register.rollout, force=force)
        evidence = done["evidence"]
        proof = "" if evidence is None else (" without the live evidence (--force)" if evidence["forced"] else
                                             " on its live evidence")
        typer.echo(f"{model_name}: champion is version {done['champion']}{proof} (previous: {done['previous']}); "
                   f"reason recorded: {reason}")

    _run(body, tensorflow=False)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="models:/NAME@alias, models:/NAME/VERSION or a local MLflow model folder.")]
    = "models:/siamese-recognizer@champion",
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    log: Annotated[bool, typer.Option(
        "--log/--no-log", help="Log every answer to the inference log of params.yaml's monitoring section "
        "($SIAMESE_INFERENCE_LOG overrides its place).")] = True,
    params: ParamsOption = None,
    reload_seconds: Annotated[float, typer.Option(
        "--reload-seconds", min=0, help="How often to check the alias (models:/NAME@alias) and swap in the version "
        "it names now, without dropping a request; 0: never.")] = 5.0,
) -> None:
    """Serve a registered model over HTTP with MLflow's scoring protocol (/invocations, /ping, /version; /ready,
    /stats and Prometheus' /metrics besides), its artifacts checked against those registered, request bodies bounded
    (SIAMESE_MAX_BODY_BYTES), concurrent requests batched, work it cannot answer in time shed with a 503 (params'
    serving section). A moved alias (promote, rollback, the gate) is followed: the new version loads beside the old,
    then answers. Serving @champion, a live shadow or canary challenger (register.rollout) is served beside it: see
    `siamese rollout status`. SIGTERM drains: requests in progress are answered and logged, then it exits."""

    def body():
        import_tensorflow_quietly()
        from pipelines.serving import serve as run_server  # uvicorn and the model's code: only when serving

        typer.echo(f"serving {model} on http://{host}:{port}/invocations", err=True)
        settings = _settings(params)
        run_server(model, host, port, settings.monitoring if log else None, reload_seconds, settings.serving)

    def check():
        _port_check(host, port)

    _run(body, check=check)


def _settings(params: Path | None):
    """The params of ``params`` (or of $SIAMESE_PARAMS or ./params.yaml; the defaults where there is none)."""

    if params is None and not os.environ.get("SIAMESE_PARAMS") and not Path("params.yaml").is_file():
        return PipelineParams()
    return load_params(params)


def _monitoring(params: Path | None):
    """The monitoring section of :func:`_settings`."""
    return _settings(params).monitoring


def _port_check(host: str, port: int) -> None:
    """A one-line ConfigError naming --port when ``host:port`` cannot be listened on (in use, not allowed)."""

    problem = bind_problem(port, host)
    if problem is not None:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({problem}); choose another port with --port")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the UI of a local store.")] = 5000,
) -> None:
    """Open the MLflow UI on this project's runs and models.

    With the local store (mlflow.db) it starts `mlflow ui` on it, until Ctrl-C. With a tracking
    server (MLFLOW_TRACKING_URI) it prints the server's address.
    """

    def body():
        from pipelines.tracking import ensure_experiment, tracking_uri  # lazy: MLflow loads in seconds

        uri = tracking_uri()
        if uri.startswith("http"):
            typer.echo(f"the tracking server's UI: {uri.rstrip('/')}")
            return

        experiment = ensure_experiment(load_params().register.experiment) if Path("params.yaml").is_file() else "0"
        typer.echo(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/{experiment}?workflowType=machine_learning "
                   "(the model-training view; Ctrl-C stops it)", err=True)
        # its own process group, so that Ctrl-C or SIGTERM here stops MLflow's server and its worker together;
        # one worker (MLflow's default is 4) serves one person's browser and starts in a quarter of the CPU time
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"], start_new_session=True,
                                  env={**MLFLOW_SERVER_DEFAULTS, **os.environ})
        group = {"pid": server.pid, "started": psutil.Process(server.pid).create_time()}
        try:
            server.wait()
        finally:
            stop_group(group, timeout=10)
            typer.echo("MLflow UI stopped", err=True)

    _run(body, tensorflow=False, check=lambda: _port_check("127.0.0.1", port))


@app.command()
def rollback(
    model_name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: ReasonOption,
) -> None:
    """Make the 'previous' version the champion again; the rolled-back one becomes 'previous'."""

    def body():
        from pipelines.registry import rollback as roll_back  # lazy: MLflow loads in seconds

        done = roll_back(model_name, reason)
        typer.echo(f"{model_name}: rolled back to version {done['champion']} (previous: {done['previous']}); "
                   f"reason recorded: {reason}")

    _run(body, tensorflow=False)


registry_app = typer.Typer(help="Look after the model registry.", no_args_is_help=True, rich_markup_mode=None)


@registry_app.command("sign")
def registry_sign(
    model_name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="A version registered before artifact digests were recorded.")],
) -> None:
    """Record the sha256 of a version's stored files, so it can be loaded and served: for versions registered
    before digests were recorded, when you trust what the artifact store holds now."""

    def body():
        from pipelines.registry import sign  # lazy: MLflow loads in seconds

        digest = sign(model_name, version)
        typer.echo(f"{model_name} version {int(version)}: artifacts_sha256 {digest} recorded")

    _run(body, tensorflow=False)


@registry_app.command("repair")
def registry_repair(
    model_name: Annotated[str, typer.Argument(help="Registered model name.")],
    older_than: Annotated[float, typer.Option(
        "--older-than", min=0, help="Seconds: younger versions without a gate decision may still be registering.")
    ] = 3600,
) -> None:
    """Mark versions left by registrations killed midway: tag registration=incomplete, end their runs FAILED."""

    def body():
        from pipelines.registry import repair  # lazy: MLflow loads in seconds

        marked = repair(model_name, older_than)
        typer.echo(f"{model_name}: marked {len(marked)} incomplete version(s)" +
                   (f": {', '.join(marked)}" if marked else ""))

    _run(body, tensorflow=False)


def _stage_names() -> list[str]:

    return list(pipeline.STAGES)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="The stage to run: validate, triplets, train, embed, evaluate or register.",
        autocompletion=_stage_names, show_default=False)],
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Run one pipeline stage in this project, as dvc.yaml does.

    It reads what the stage table says the stage reads and writes its outputs atomically.
    The stages after train log to the MLflow run that trained the model; register ends it.
    """

    def body():

        from pipelines.runner import run_alone  # lazy: MLflow loads in seconds

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        run_alone(name, settings["params"])

    settings = {}

    def check():

        if name not in pipeline.STAGES:
            raise ConfigError(f"no stage '{name}': the stages are {', '.join(pipeline.STAGES)}")
        settings["params"] = load_params(params, parse_set_options(set_ or []))

    _run(body, check=check)  # every stage loads TensorFlow (MLflow imports Keras): quietly, after the checks


@app.command("dvc-yaml")
def dvc_yaml(
    params: ParamsOption = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Write nothing; exit with status 1 when dvc.yaml differs from what would be written.")
    ] = False,
) -> None:
    """Write dvc.yaml from the stage table and params.yaml.

    Each stage's deps are the code it imports, the data folders params.yaml sets and the
    artifacts it reads. Run it again after setting an optional folder to null or back.
    """

    def body():

        text = pipeline.dvc_yaml(load_params(params))
        current = Path("dvc.yaml").read_text(encoding="utf-8") if Path("dvc.yaml").is_file() else ""
        if check:
            if current != text:
                _fail("dvc.yaml is not what the stage table and params.yaml give: run 'siamese dvc-yaml'")
            typer.echo("dvc.yaml is current")
            return
        Path("dvc.yaml").write_text(text, encoding="utf-8")
        typer.echo("wrote dvc.yaml" + ("" if current == text else " (changed)"))

    _run(body, tensorflow=False)


rollout_app = typer.Typer(help="Shadow and canary rollouts: the challenger on live traffic.", no_args_is_help=True,
                          rich_markup_mode=None)


@rollout_app.command("status")
def rollout_status(
    model_name: Annotated[str | None, typer.Argument(help="Registered model name (default: params' register.model_name).")]
    = None,
    params: ParamsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Both versions on live traffic, pooled over every serving replica: requests, agreement, unknown and error
    rates, latency; and what promoting the challenger still needs."""

    def body():

        from pipelines import registry  # lazy: MLflow loads in seconds

        found = registry.rollout_status(model_name or _settings(params).register.model_name)
        if as_json:
            typer.echo(json.dumps(found, indent=1))
            return
        typer.echo(f"{found['model_name']}: champion version {found['champion']}, challenger version "
                   f"{found['challenger']}" + ("" if found["plan"] is None else f" in {found['mode']} rollout"))
        if found["plan"] is None:
            typer.echo("no live rollout: the champion answers everything")
            return
        counts = found["counts"]
        typer.echo(f"{'':12}{'version':>8}{'requests':>10}{'images':>8}{'unknown':>9}{'errors':>8}{'mean ms':>9}"
                   f"{'p95 ms':>8}")
        for role, version in (("champion", found["champion"]), ("challenger", found["challenger"])):
            mine = counts[role]
            typer.echo(f"{role:12}{version:>8}{mine['requests']:>10}{mine['images']:>8}{_percent(mine['unknown_rate']):>9}"
                       f"{_percent(mine['error_rate']):>8}{_figure(mine['mean_ms']):>9}{_figure(mine['p95_ms']):>8}")
        typer.echo(f"agreement: {_percent(counts['agreement'])} of {counts['compared']} images answered by both "
                   f"({counts['skipped']} requests not compared); {counts['replicas']} replica(s) reporting; "
                   f"{counts['challenger']['keys']} client keys on the challenger, each counted for "
                   f"{found['plan']['key_cap']} at most ({counts['capped']} requests over that)")
        if counts["unverified"]:
            typer.echo(f"unverified (no valid signature, left out of the counts): {', '.join(counts['unverified'])}")
        typer.echo("promotion: " + ("the evidence is there (siamese promote)" if not found["missing"] else
                                    "needs " + "; ".join(found["missing"])))

    _run(body, tensorflow=False)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


flows_app = typer.Typer(help="Run the pipeline's Prefect flows.", no_args_is_help=True, rich_markup_mode=None)


@flows_app.command("serve")
def flows_serve(params: ParamsOption = None) -> None:
    """Serve the retraining and monitoring flows on the schedules of params.yaml, one run of each at a time;
    a drift event of the monitoring starts a retraining.

    It blocks until Ctrl-C. Scheduled runs need a Prefect server (PREFECT_API_URL set).
    """

    def body():
        from pipelines.flows import serve as serve_flows  # lazy: Prefect and MLflow load in seconds

        serve_flows(str(params or "params.yaml"))

    _run(body, tensorflow=False)


@flows_app.command("monitor")
def flows_monitor(
    window_hours: Annotated[float | None, typer.Option(
        "--window-hours", help="How much of the inference log to judge (default: monitoring.window_hours).")] = None,
    params: ParamsOption = None,
) -> None:
    """Run the monitoring flow once: the inference log's last window (the answers the champion gave clients)
    against its reference; shadow and canary records counted apart; where a drift event went; the report."""

    def body():
        from pipelines.flows import monitoring_flow  # lazy: Prefect and MLflow load in seconds
        from pipelines.monitoring_run import rollout_line  # lazy: Prefect and MLflow load in seconds

        result = monitoring_flow(str(params or "params.yaml"), window_hours)
        figures = ", ".join(f"{key} {value:.4g}" for key, value in result["figures"].items() if value is not None)
        typer.echo(f"version {result['model_version']}: {figures}")
        for other in result["rollouts"]:
            typer.echo(rollout_line(other))
        typer.echo(f"drift: {'; '.join(result['fired'])}" if result["fired"] else "no rule fired")
        if result["event"]:
            typer.echo(f"drift event: {result['event']}")
        for note in result["notes"]:
            typer.echo(f"note: {note}")
        typer.echo(f"report: {result['report']} ({result['report_uri']})")

    _run(body, tensorflow=False)


review_app = typer.Typer(help="The review queue in Label Studio: send pending answers, bring labels back.",
                         no_args_is_help=True, rich_markup_mode=None)
LabelStudioOption = Annotated[str, typer.Option(
    "--label-studio", envvar="LABEL_STUDIO_URL", help="The Label Studio server ($LABEL_STUDIO_URL); its API token "
    "comes from $LABEL_STUDIO_API_KEY.")]


def _review_dir(params: Path | None) -> Path:
    return Path(_monitoring(params).review_dir)


@review_app.command("push")
def review_push(label_studio: LabelStudioOption, params: ParamsOption = None) -> None:
    """Send the pending review images (not sent before) as tasks, the model's answer pre-annotated."""

    def body():

        done = push_review(_review_dir(params), LabelStudio(label_studio))
        for line in done["skipped"]:
            typer.echo(f"skipped: {line}", err=True)
        typer.echo(f"{done['sent']} tasks sent to project {done['project']} at {label_studio}")

    _run(body, tensorflow=False)


@review_app.command("pull")
def review_pull(label_studio: LabelStudioOption, params: ParamsOption = None) -> None:
    """Move the images labelled in Label Studio to labelled/<class>/, ready for `siamese feedback import`."""

    def body():

        settings = _settings(params)
        done = pull_labels(settings.monitoring.review_dir, LabelStudio(label_studio), train_dir=settings.data.train_dir)
        for line in done["refused"]:
            typer.echo(f"refused: {line}", err=True)
        moved = ", ".join(f"{label} {n}" for label, n in sorted(done["labelled"].items())) or "none yet"
        typer.echo(f"labelled: {moved}")
        typer.echo(f"pulled {sum(done['labelled'].values())}, refused {len(done['refused'])}, "
                   f"not labelled yet {done['waiting']}")
        if done["refused"]:
            _fail(f"{len(done['refused'])} refused (above): fix those labels in Label Studio, then pull again")

    _run(body, tensorflow=False)


feedback_app = typer.Typer(help="Bring corrected answers back into the training data.", no_args_is_help=True,
                           rich_markup_mode=None)


@feedback_app.command("import")
def feedback_import(
    labelled: Annotated[Path | None, typer.Argument(
        help="Reviewed images in <label>/ folders (default: <monitoring.review_dir>/labelled).")] = None,
    into: Annotated[Path | None, typer.Option(
        "--into", help="The training folder to add them to (default: data.train_dir).")] = None,
    by: Annotated[str, typer.Option("--by", help="Who labelled them (kept in the manifest).")] = "",
    dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="Run dvc add on the data folder afterwards.")] = True,
    params: ParamsOption = None,
) -> None:
    """Add labelled review images to the training data (new classes allowed), with a manifest in feedback/.

    Nothing is rewritten: an image already imported is skipped, and one bad image stops the import before
    anything is copied. The data folder is then dvc add-ed, so the next retraining sees a new data version.
    """

    def body():

        settings = _settings(params)
        source = labelled or Path(settings.monitoring.review_dir) / "labelled"
        target = into or Path(settings.data.train_dir)
        done = import_feedback(source, target, by or os.environ.get("USER", ""), dvc)
        typer.echo(f"{len(done['images'])} images of {len(done['classes'])} classes added to {target} "
                   f"({done['skipped_already_present']} already there); manifest {done['manifest']}")
        if done["dvc"]:
            typer.echo(f"new data version: git add {done['dvc']} {done['manifest']} && git commit, then dvc push")

    _run(body, tensorflow=False)


gallery_app = typer.Typer(help="List and correct what a gallery knows: its classes and images.", no_args_is_help=True,
                          rich_markup_mode=None)
GalleryModel = Annotated[str, typer.Argument(
    help="A bundle folder, or a registered model: models:/NAME@ALIAS or models:/NAME/VERSION.")]
EditReasonOption = Annotated[str, typer.Option("--reason", help="Why: kept in the new version's card and the "
                                               "bundle's metadata.")]


@gallery_app.command("list")
def gallery_list(
    model: GalleryModel,
    images: Annotated[bool, typer.Option("--images", help="List each entry: its stable id, class and source "
                                         "sha256.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The gallery's classes with their image counts (with --images, each entry)."""

    def body():
        from pipelines import gallery_ops  # lazy: MLflow loads in seconds

        gallery = gallery_ops.read_gallery(model)
        found = gallery_ops.entries(gallery) if images else gallery_ops.class_counts(gallery)
        if as_json:
            typer.echo(json.dumps(found, ensure_ascii=False))
        elif images:
            for entry in found:
                typer.echo(f"{entry['id']}\t{entry['class']}\t{entry['sha256'] or '-'}\t{entry['path']}")
        else:
            for name, count in found.items():
                typer.echo(f"{name}\t{count}")

    _run(body, tensorflow=False)


def _gallery_edit(model: str, edit, params: Path | None) -> None:
    from pipelines import gallery_ops  # lazy: MLflow loads in seconds

    if not model.startswith("models:/"):
        _check_model(model)
        with _bundle_lock(Path(model), timeout=-1):
            done = gallery_ops.edit_bundle(model, edit)
        typer.echo(f"{done['bundle']}: {done['change']}; gallery now {done['images']} images in {done['classes']} "
                   "classes")
        return
    name, _, source = model.removeprefix("models:/").partition("@")
    if not source:
        name, _, source = name.partition("/")
    done = gallery_ops.edit_registered(name, source or "champion", edit, _settings(params).register)
    typer.echo(f"{name} version {done['version']} ({done['alias'] or 'no alias'}), from version {done['from']}: "
               f"{done['change']}; gallery {done['images']} images in {done['classes']} classes")
    typer.echo(f"gate: {done['gate']}")


@gallery_app.command("remove")
def gallery_remove(
    model: GalleryModel,
    reason: EditReasonOption,
    classes: Annotated[list[str] | None, typer.Option("--class", help="A class to remove; repeatable.")] = None,
    image: Annotated[list[str] | None, typer.Option(
        "--image", help="An entry to remove, by its id or source sha256 (`siamese gallery list --images`); "
        "repeatable.")] = None,
    params: ParamsOption = None,
) -> None:
    """Remove classes or entries. A bundle folder is rewritten in place; a registered model gets a new version, made
    champion through the gate's checks when edited from the champion."""

    def body():
        from pipelines.gallery_ops import Edit  # lazy: MLflow loads in seconds

        if not classes and not image:
            _fail("give --class or --image: what to remove")
        _gallery_edit(model, Edit(reason, tuple(classes or ()), tuple(image or ())), params)

    _run(body, tensorflow=model.startswith("models:/"))  # a new version is checked to serve


@gallery_app.command("relabel")
def gallery_relabel(
    model: GalleryModel,
    old: Annotated[str, typer.Option("--class", help="The class to rename.")],
    new: Annotated[str, typer.Option("--to", help="Its new name (merged into that class if it exists).")],
    reason: EditReasonOption,
    params: ParamsOption = None,
) -> None:
    """Rename a class (or merge it into another). A registered model gets a new version, as with remove."""

    def body():
        from pipelines.gallery_ops import Edit  # lazy: MLflow loads in seconds

        _gallery_edit(model, Edit(reason, renames={old: new}), params)

    _run(body, tensorflow=model.startswith("models:/"))


@app.command("predict-batch")
def predict_batch(
    input_uri: Annotated[str, typer.Argument(metavar="INPUT", help="A folder or an s3:// prefix of images.")],
    out: Annotated[Path, typer.Option("--out", help="The Parquet table to write; its parts go to OUT.parts/.")],
    model: Annotated[str | None, typer.Option(
        "--model", help="A bundle folder or a registry URI (default: models:/<register.model_name>@champion).")] = None,
    dask_address: DaskOption = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard (one part file each).")] = 512,
    params: ParamsOption = None,
) -> None:
    """Recognise every image of a folder or bucket prefix into one Parquet table, shard by shard: a rerun skips the
    shards already written; an unreadable image is a row with its error."""

    def body():
        from pipelines.batch_predict import predict_with  # lazy: TensorFlow

        uri = model or f"models:/{_settings(params).register.model_name}@champion"
        _check_model(uri)
        done = predict_with(uri, input_uri, out, sharding.dask_address(dask_address), shard_size)
        typer.echo(f"{done['images']} images ({done['errors']} with errors) by {done['model']} into {done['out']}: "
                   f"{done['shards']} shards, {done['skipped_shards']} already written")

    _run(body)


@app.command()
def erase(
    reason: Annotated[str, typer.Option("--reason", help="Why (the request): kept in the audit record.")],
    name: Annotated[str | None, typer.Option("--class", help="The class to erase everywhere.")] = None,
    digests: Annotated[list[str] | None, typer.Option(
        "--image-digest", help="The sha256 of an image to erase everywhere; repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List every place and object; change nothing.")] = False,
    label_studio: Annotated[str | None, typer.Option(
        "--label-studio", envvar="LABEL_STUDIO_URL", help="The review queue's Label Studio server ($LABEL_STUDIO_URL, "
        "token in $LABEL_STUDIO_API_KEY): its tasks showing or naming them are deleted too.")] = None,
    as_json: JsonOption = False,
    params: ParamsOption = None,
) -> None:
    """Erase a class or images from every place the pipeline keeps them: the data and its DVC cache and remote,
    every registered version (the champion gets a new version without them), pipeline outputs, run artifacts, the
    inference log, the review queue and its Label Studio tasks, the stage cache and run workspaces, and the tracking
    database's rows naming the class; an audit record goes to the <experiment>-erasure experiment. With a tracking
    server, $MLFLOW_BACKEND_STORE_URI names its database."""

    def body():
        from pipelines import erasure  # lazy: MLflow loads in seconds

        settings = _settings(params)
        if not name and not digests:
            _fail("give --class or --image-digest: what to erase")
        found = set(d.lower() for d in digests or ())
        if name:
            found |= erasure.class_digests(settings, name)
        studio = LabelStudio(label_studio) if label_studio else None
        done = erasure.erase(settings, erasure.Target(name, frozenset(found)), reason, dry_run, studio=studio)
        if as_json:
            typer.echo(json.dumps(done, ensure_ascii=False))
            return
        for place, objects in done["places"].items():
            typer.echo(f"{place}: {len(objects)}")
            for item in objects:
                typer.echo(f"  {item}")
        if not dry_run:
            typer.echo(f"erased; audit run {done['audit_run']}, new champion version {done['new_version'] or 'none'}")

    _run(body, tensorflow=not dry_run)


from pipelines.stack import stack_app  # the `siamese stack` commands

app.add_typer(stack_app, name="stack")
app.add_typer(registry_app, name="registry")
app.add_typer(flows_app, name="flows")
app.add_typer(rollout_app, name="rollout")
app.add_typer(feedback_app, name="feedback")
app.add_typer(review_app, name="review")
app.add_typer(gallery_app, name="gallery")


def __getattr__(name: str) -> object:
    """``pipelines.cli.command``: the click command behind ``app``, which the CLI reference page renders."""
    if name == "command":
        return typer.main.get_command(app)
    raise AttributeError(name)

if __name__ == "__main__":
    app(sys.argv[1:])
