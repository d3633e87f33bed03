"""MLflow tracking: one run per pipeline run, ended in one place (:func:`pipeline_run`).

A :class:`PipelineRun` addresses a run by id, so any thread or process can log to it.
Metrics are logged as they happen (one point per epoch while training runs), the data
enters as dataset inputs with their DVC digests, and a failure ends the run FAILED with
the stage and the error. The registry side (versions, aliases, the gate) is in
:mod:`pipelines.registry`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import posixpath
import re
import secrets
import subprocess
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from siamese_core.data import colour_share, scan_folder
from siamese_core.errors import ConfigError, DatasetError
from siamese_core.metrics import flatten, is_number

from .feedback import feedback_batches
from .files import content_hash, read_json
from .params import PipelineParams
from .pipeline import HISTORY_FILE, RUN_FILE

log = logging.getLogger("pipelines.tracking")

# MLflow 3's UI opens an experiment of this kind on its training-runs view, not the GenAI one.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# Nested numeric dicts of the evaluation report become metrics named "<prefix>.<key>".
METRIC_PREFIXES = {"per_class_accuracy": "acc_class"}
_SAFE_METRIC_KEY = re.compile(r"[\w.\- ]+")
SYSTEM_METRICS_INTERVAL_S = 5
UI_ADDRESS = "http://127.0.0.1:5000"  # where `siamese ui` serves a local store's UI
LINEAGE_TAGS = ("git_commit", "dvc.experiment", "prefect.flow_run_url", "training_run_id")


def project_root() -> Path:
    """The DVC project this process works for: ``$DVC_ROOT`` (set by DVC, also for queued
    experiments that run in a temporary copy), else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, or a SQLite database ``mlflow.db`` in :func:`project_root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def ui_url() -> str:
    """Where the MLflow UI is: ``$MLFLOW_UI_URL``, the tracking server, or ``siamese ui``'s address."""
    uri = tracking_uri()
    return (os.environ.get("MLFLOW_UI_URL") or (uri if uri.startswith("http") else UI_ADDRESS)).rstrip("/")


def ui_links(experiment_id: str, record: dict) -> tuple[str, str]:
    """Links to a registration's run and model version in the MLflow UI."""
    ui = ui_url()
    return (f"{ui}/#/experiments/{experiment_id}/runs/{record['run_id']}",
            f"{ui}/#/models/{record['model_name']}/versions/{record['version']}")


def _artifact_location(uri: str) -> str | None:
    """``mlartifacts`` next to a SQLite database; a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


_READY_STORES: set[str] = set()


def client() -> MlflowClient:
    """A client on :func:`tracking_uri`; MLflow's fluent API is pointed there too.

    A new SQLite store is created under a file lock: two processes creating it at once
    would otherwise race on its tables (``table experiments already exists``). It is created
    private to its owner (0600, and SQLite gives its journals the database's mode); an existing
    database keeps the mode it has, so one the user opened stays open.
    """
    uri = tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _READY_STORES:
        database = Path(uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(database.with_suffix(".init.lock"), timeout=300):
            with contextlib.suppress(FileExistsError):  # an empty file is an empty database to SQLite and MLflow
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            MlflowClient(uri).search_experiments(max_results=1)
        _READY_STORES.add(uri)
    return MlflowClient(uri)


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created with an explicit artifact location if missing.

    The experiment is marked as model training, so MLflow's UI opens it on its runs table.
    """
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = mlflow_client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
        except mlflow.exceptions.MlflowException:  # another run created it a moment ago
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    elif experiment.lifecycle_stage != "active":
        raise ConfigError(
            f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set register.experiment to another name"
        )
    else:
        experiment_id = experiment.experiment_id
    if experiment is None or experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow_client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    return experiment_id


def _is_safe_metric_key(key: str) -> bool:
    return bool(_SAFE_METRIC_KEY.fullmatch(key)) and posixpath.normpath(key) == key


def metric_values(metrics: dict) -> dict[str, float]:
    """The numeric figures of an evaluation report as MLflow metrics.

    A dict of numbers (per-class accuracy) becomes ``<prefix>.<name>`` metrics; names MLflow
    would refuse are skipped, as is anything not numeric (the confusion matrix is an artifact).
    """
    values = {}
    for key, value in metrics.items():
        if is_number(value):
            values[key] = float(value)
        elif isinstance(value, dict) and value and all(is_number(v) for v in value.values()):
            prefix = METRIC_PREFIXES.get(key, key)
            values.update({f"{prefix}.{name}": float(v) for name, v in value.items()})
    return {key: value for key, value in values.items() if _is_safe_metric_key(key)}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                              cwd=project_root())
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> str:
    """The checked-out git commit of the project, or "unknown" outside a git repository."""
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Whether tracked files differ from the commit (the run's code or params are not exactly the commit's)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def data_versions(params: PipelineParams) -> dict[str, str]:
    """DVC's content hash of each data folder the pipeline reads: ``{"train": "<md5>.dir", ...}``."""
    folders = {"train": params.data.train_dir, "test": params.data.test_dir}
    if params.data.heldout_dir:
        folders["heldout"] = params.data.heldout_dir
    return {split: content_hash(folder) for split, folder in folders.items()}


def data_hash(params: PipelineParams, versions: dict[str, str] | None = None) -> str:
    """``<train md5>+<test md5>``: the version of the training data, as DVC hashes it (from ``versions`` if given)."""
    versions = versions or data_versions(params)
    return f"{versions['train']}+{versions['test']}"


def context_tags() -> dict[str, str]:
    """Where this run comes from: git commit, user, DVC experiment, Prefect flow run (id and UI link)."""
    tags = {"git_commit": git_commit(), "git_dirty": str(git_dirty()).lower(), "mlflow.user": getpass.getuser()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    from prefect.runtime import flow_run  # lazy: Prefect takes seconds to import, and only a flow's run needs it

    if flow_run.id:
        tags.update({"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)})
        if flow_run.ui_url:
            tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


def run_name(params: PipelineParams, data_hash_value: str) -> str:
    """A readable, unique run name: experiment or flow-run name, UTC time, model, data version, a random suffix.

    What tells runs apart comes first, as the MLflow runs table shows only the start of a name.
    """
    from prefect.runtime import flow_run  # lazy: Prefect takes seconds to import, and only a flow's run needs it

    origin = os.environ.get("DVC_EXP_NAME") or (flow_run.name if flow_run.id else None)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    parts = [origin, stamp, params.model.backbone, f"data-{data_hash_value[:8]}", secrets.token_hex(2)]
    return "-".join(str(p) for p in parts if p)


def data_profiles(params: PipelineParams, versions: dict[str, str] | None = None) -> dict[str, dict]:
    """Each data folder's path, DVC digest and profile (classes, images, images per class); missing folders left out."""
    versions = versions or data_versions(params)
    folders = {"train": params.data.train_dir, "test": params.data.test_dir, "heldout": params.data.heldout_dir}
    profiles = {}
    for split, digest in versions.items():
        if digest == "missing":
            continue
        folder = folders[split]
        if folder is None:
            continue
        images = scan_folder(folder)
        counts = Counter(images.label_names)
        profiles[split] = {"path": str(folder), "md5": digest, "classes": len(images.class_names),
                           "images": len(images), "images_per_class": dict(sorted(counts.items())),
                           "colour_share": colour_share(list(images.paths))}
    return profiles


@dataclass(frozen=True)
class DataIdentity:
    """What a run's model was trained and scored on: DVC digests per split, their joint digest (:func:`data_hash`),
    the folders' profiles, and the git commit of the code."""

    versions: dict[str, str]
    digest: str
    profiles: dict[str, dict]
    commit: str


def unchanged_data(params: PipelineParams, run: PipelineRun) -> DataIdentity:
    """The data's identity now; DatasetError when it is not the data ``run`` started on (its model may mix both)."""
    versions = data_versions(params)
    now = data_hash(params, versions)
    started_on = run.client.get_run(run.run_id).data.tags.get("data_hash")
    if started_on and started_on != now:
        raise DatasetError(f"the data changed while this run was in progress (from {started_on} to {now}): "
                           "its model may mix both versions, so it is not registered; run the pipeline again")
    return DataIdentity(versions, now, data_profiles(params, versions), git_commit())


CONTEXTS = {"train": "training", "test": "evaluation", "heldout": "few-shot"}
# A data folder is a table of (image path, class) rows, in the column schema MLflow's UI reads.
DATASET_SCHEMA = json.dumps({"mlflow_colspec": [{"type": "string", "name": "image", "required": True},
                                                {"type": "string", "name": "class", "required": True}]})


def _dataset_input(split: str, profile: dict, commit: str) -> DatasetInput:
    """A data folder as an MLflow dataset input: its DVC digest, source (path, digest, git commit) and profile. The
    profile holds counts, never class names: MLflow has no call to change a dataset row, and a face's class is a
    person's name (the per-class figures are the run's artifacts, which an erasure can delete)."""
    counts = profile["images_per_class"].values()
    summary = {"classes": profile["classes"], "images": profile["images"],
               "images_per_class": {"min": min(counts), "max": max(counts)}}
    source = {"path": profile["path"], "dvc_md5": profile["md5"], "git_commit": commit}
    dataset = Dataset(name=f"{Path(profile['path']).parent.name or 'data'}-{split}",
                      digest=profile["md5"].removesuffix(".dir"), source_type="local", source=json.dumps(source),
                      schema=DATASET_SCHEMA, profile=json.dumps(summary))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", CONTEXTS[split])])



def _feedback_input(manifest: dict, digest: str) -> DatasetInput:
    """An imported feedback batch (``siamese feedback import``) as a dataset input: its manifest's digest, who
    labelled it, when, and how many images and classes it added (counts, never class names, as for a data folder)."""
    classes = {image["label"] for image in manifest["images"]}
    source = {"manifest": f"feedback/{manifest['batch']}.json", "into": manifest["into"],
              "imported_by": manifest["imported_by"], "imported_at": manifest["imported_at"]}
    dataset = Dataset(name=f"feedback-{manifest['batch']}", digest=digest[:32], source_type="local",
                      source=json.dumps(source), schema=DATASET_SCHEMA,
                      profile=json.dumps({"images": len(manifest["images"]), "classes": len(classes)}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "feedback")])


class PipelineRun:
    """The MLflow run of one pipeline run, addressed by id (safe across threads and processes)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = client()

    @classmethod
    def create(cls, experiment_id: str, name: str, tags: dict[str, str]) -> PipelineRun:
        """Open a plain run (an enrolment's) with the context tags and ``tags``."""
        run = client().create_run(experiment_id, run_name=name, tags={**context_tags(), **tags})
        return cls(run.info.run_id)

    @classmethod
    def resume(cls, run_id: str) -> PipelineRun:
        """Open an ended run again, for one more part of the same work (a window of a version's monitoring):
        RUNNING, without the error of its last end. :func:`tracked_run` ends it again."""
        run = cls(run_id)
        for key in ("error", "failed_stage"):
            if key in run.client.get_run(run_id).data.tags:
                run.client.delete_tag(run_id, key)
        run.client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))
        return run

    @classmethod
    def start(cls, params: PipelineParams, description: str = "") -> PipelineRun:
        """Open a run: a unique name, the params, the context tags and the data as dataset inputs."""
        versions = data_versions(params)
        data = data_hash(params, versions)
        mlflow_client = client()
        context = context_tags()
        tags = {**context, "data_hash": data, "mlflow.note.content": description or _describe(params)}
        run = mlflow_client.create_run(ensure_experiment(params.register.experiment),
                                       run_name=run_name(params, data), tags=tags)
        started = cls(run.info.run_id)
        started.client.log_batch(started.run_id, params=[
            Param(key, str(value)) for key, value in flatten(params.model_dump(mode="json")).items()])
        started.client.log_inputs(started.run_id, datasets=[
            *(_dataset_input(split, profile, context["git_commit"])
              for split, profile in data_profiles(params, versions).items()),
            *(_feedback_input(manifest, digest) for manifest, digest in feedback_batches(params.data.train_dir))])
        log.info("MLflow run %s (%s) opened in %s", run.info.run_name, started.run_id, tracking_uri())
        return started

    @property
    def info(self):
        return self.client.get_run(self.run_id).info

    @property
    def is_open(self) -> bool:
        return self.info.status == "RUNNING"

    def lineage(self) -> dict[str, str]:
        """Where the run's model comes from, for its card: the run's name and id, and its lineage tags."""
        run = self.client.get_run(self.run_id)
        return {"MLflow run": f"{run.info.run_name} ({self.run_id})",
                **{key: value for key, value in run.data.tags.items() if key in LINEAGE_TAGS}}

    def _log_points(self, points: list[tuple[str, float, int]]) -> None:
        """``(key, value, step)`` points, in batches MLflow accepts (at most 1000 metrics each)."""
        now = get_current_time_millis()
        metrics = [Metric(key, float(value), now, step) for key, value, step in points]
        for start in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 900])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._log_points([(key, value, step) for key, value in metric_values(metrics).items()])

    def log_history(self, history: dict[str, list[float]]) -> None:
        """Per-epoch values after the fact (a training this run reused), step = epoch index from 0."""
        self._log_points([(key, v, step) for key, values in history.items() for step, v in enumerate(values)])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: artifact to log does not exist")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def epoch_callback(self):
        """A Keras callback logging each epoch's figures to this run as it ends (the UI shows a live curve)."""
        import keras  # lazy: TensorFlow, only for a training that logs its epochs

        run = self

        class LogEpochToMlflow(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                figures = {key: float(value) for key, value in (logs or {}).items()}
                run.log_metrics(figures, step=epoch)
                shown = ", ".join(f"{key} {value:.4f}" for key, value in figures.items())
                log.info("epoch %d/%d: %s", epoch + 1, self.params.get("epochs", 0), shown)

        return LogEpochToMlflow()

    @contextmanager
    def system_metrics(self):
        """CPU, memory, disk and network (and GPU where present) logged to the run every few seconds."""
        # private: see tests/test_private_apis.py
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       resume_logging=True, tracking_uri=tracking_uri())
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def record_reused_training(self, trained: Path) -> None:
        """Tag the run with the run that trained the model in ``trained`` (artifacts/train) and copy its curve."""
        self.set_tags({"training_run_id": read_json(trained / RUN_FILE)["run_id"]})
        self.log_history(read_json(trained / HISTORY_FILE)["history"])

    def end(self, error: BaseException | None = None, stage: str | None = None) -> None:
        """End the run (:func:`end_run`)."""
        end_run(self.client, self.run_id, error, stage)


def end_run(mlflow: MlflowClient, run_id: str, error: BaseException | None = None, stage: str | None = None) -> None:
    """End a run, the one way every run of the project ends: FINISHED, or FAILED with the error (and the stage) as
    tags and ``error.txt``, KILLED for an interrupt."""
    if error is None:
        mlflow.set_terminated(run_id, "FINISHED")
        return
    killed = isinstance(error, KeyboardInterrupt)
    message = f"{type(error).__name__}: {error}"
    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                   {"error": message[:5000], **({"failed_stage": stage} if stage else {})}.items()])
    mlflow.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
    mlflow.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED))


@contextmanager
def ending(mlflow: MlflowClient, run_id: str) -> Iterator[None]:
    """End the run ``run_id`` (opened outside a pipeline: a tuning study or trial, an erasure's audit) with the
    block, as :func:`end_run` says for how the block ended."""
    try:
        yield
    except BaseException as exc:
        end_run(mlflow, run_id, exc)
        raise
    end_run(mlflow, run_id)


def _trained_by(trained: Path) -> str | None:
    """The id of the run that trained the model in ``trained`` (artifacts/train), if one is recorded."""
    record = trained / RUN_FILE
    return read_json(record)["run_id"] if record.is_file() else None


def _open_run(run_id: str) -> PipelineRun | None:
    """Run ``run_id`` if it is still open in this tracking store."""
    try:
        run = PipelineRun(run_id)
        return run if run.is_open else None
    except MlflowException as exc:  # a run of another tracking store, or deleted since
        log.info("training run %s not found (%s): opening a new run", run_id, exc)
        return None


class RunScope:
    """The MLflow run of one pipeline run, as the stages see it: opened on first use (or attached to the
    run that trained the model, while that run is open), and the stage now running, for a failure's tags."""

    def __init__(self, open_run: Callable[[], PipelineRun], trained: Path | None = None):
        self.open_run = open_run
        self.trained = trained
        self.stage: str | None = None
        self._run: PipelineRun | None = None

    @property
    def run(self) -> PipelineRun:
        """The run, opened (or attached to) now if no stage has used it yet."""
        if self._run is None:
            trained_by = _trained_by(self.trained) if self.trained is not None else None
            self._run = (trained_by and _open_run(trained_by)) or self.open_run()
            if self.trained is not None and trained_by not in (None, self._run.run_id):
                self._run.record_reused_training(self.trained)
        return self._run

    @property
    def used(self) -> bool:
        return self._run is not None

    @contextmanager
    def system_metrics(self):
        """CPU, memory, disk and network figures logged to the run while the block runs."""
        with self.run.system_metrics():
            yield


@contextmanager
def tracked_run(open_run: Callable[[], PipelineRun], trained: Path | None = None, end: bool = True) -> Iterator[RunScope]:
    """The one place a run ends. Inside the block the code uses ``scope.run`` (opened by ``open_run`` on
    first use); an exception ends it FAILED with ``scope.stage`` and the error (opening a run to record
    it if none was used yet) and propagates. Without one it ends FINISHED, when ``end`` is set and the
    block used the run."""
    scope = RunScope(open_run, trained)
    try:
        yield scope
    except BaseException as exc:
        scope.run.end(exc, scope.stage)
        raise
    if end and scope.used:
        scope.run.end()


def pipeline_run(params: PipelineParams, trained: Path | None = None, end: bool = True):
    """:func:`tracked_run` for a pipeline run of ``params``.

    The Prefect flow wraps all its stages in one block. Under ``dvc repro`` each stage is a process of
    its own: the train stage opens the run, later stages attach to it through ``trained``
    (artifacts/train/run.json) while it is open, and the register stage, the last, ends it (``end``).
    """
    return tracked_run(lambda: PipelineRun.start(params), trained, end)


def _describe(params: PipelineParams) -> str:
    """The run's description: what was trained on what."""
    return (f"Siamese triplet-loss recogniser: {params.model.backbone} at {params.model.input_size} px, "
            f"{params.model.embedding_dim}-d embeddings, {params.train.mining} mining, {params.train.epochs} epochs; "
            f"trained on `{params.data.train_dir}`, scored on `{params.data.test_dir}`"
            + (f", few-shot on `{params.data.heldout_dir}`." if params.data.heldout_dir else "."))
