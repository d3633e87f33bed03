"""MLflow tracking and registry: one run per training, the bundle as a pyfunc model, and the champion gate."""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import tempfile
from collections import Counter
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from .errors import NoChampionError
from .params import PipelineParams

CHAMPION, CHALLENGER = "champion", "challenger"
# Nested numeric dicts of the evaluation report become metrics named "<prefix>.<key>".
METRIC_PREFIXES = {"per_class_accuracy": "acc_class"}
_SAFE_METRIC_KEY = re.compile(r"[\w.\- ]+")
_PACKAGE_DIRS = [str(Path(__file__).resolve().parents[1] / name) for name in ("siamese_core", "pipelines")]


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, or a SQLite database ``./mlflow.db`` (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def _artifact_location(uri: str) -> str | None:
    """``mlartifacts`` next to a SQLite database; a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def _client() -> MlflowClient:
    """A client on :func:`tracking_uri`; MLflow's fluent API is pointed there too."""
    uri = tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created with an explicit artifact location if missing."""
    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set register.experiment to another name"
        )
    return experiment.experiment_id


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys: ``{"model": {"margin": 0.5}} -> {"model.margin": 0.5}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_safe_metric_key(key: str) -> bool:
    return bool(_SAFE_METRIC_KEY.fullmatch(key)) and posixpath.normpath(key) == key


def metric_values(metrics: dict) -> dict[str, float]:
    """The numeric figures of an evaluation report as MLflow metrics.

    A dict of numbers (per-class accuracy) becomes ``<prefix>.<name>`` metrics; names MLflow
    would refuse are skipped, as is anything not numeric (the confusion matrix is an artifact).
    """
    values = {}
    for key, value in metrics.items():
        if _is_number(value):
            values[key] = float(value)
        elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
            prefix = METRIC_PREFIXES.get(key, key)
            values.update({f"{prefix}.{name}": float(v) for name, v in value.items()})
    return {key: value for key, value in values.items() if _is_safe_metric_key(key)}


def _champion_value(client: MlflowClient, model_name: str, metric: str) -> tuple[str | None, float | None]:
    """The champion version and its figure on ``metric`` (from its run), or ``(None, None)``."""
    champion = client.get_registered_model(model_name).aliases.get(CHAMPION)
    if champion is None:
        return None, None
    run_id = client.get_model_version(model_name, champion).run_id
    value = client.get_run(run_id).data.metrics.get(metric) if run_id else None
    return str(champion), value


def _gate_lock() -> FileLock:
    """A lock that serialises champion decisions of runs sharing one tracking store on this machine."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).with_suffix(".gate.lock")
    else:
        path = Path(tempfile.gettempdir()) / f"siamese-gate-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    return FileLock(path, timeout=600)


def apply_gate(
    client: MlflowClient, run_id: str, model_name: str, version: str, metric: str, value: float, greater_is_better: bool
) -> tuple[str, float | None]:
    """Give ``version`` the champion alias if ``value`` strictly beats the champion's, else challenger.

    The read-compare-move runs under a lock, so two runs finishing at once cannot
    both compare against the same old champion and leave the worse one in place.
    The decision and both figures are logged on run ``run_id`` and on the version.
    Returns ``(decision, previous champion value)``.
    """
    with _gate_lock():
        previous_version, previous = _champion_value(client, model_name, metric)
        wins = previous is None or (value > previous if greater_is_better else value < previous)
        decision = CHAMPION if wins else CHALLENGER
        gate = {
            "gate.decision": decision,
            "gate.metric": metric,
            "gate.value": str(value),
            "gate.previous_champion_version": str(previous_version),
            "gate.previous_champion_value": str(previous),
        }
        for key, tag in gate.items():
            client.set_tag(run_id, key, tag)
            client.set_model_version_tag(model_name, version, key, tag)
        if previous is not None:
            client.log_metric(run_id, f"previous_champion.{metric}", previous)
        client.set_registered_model_alias(model_name, decision, version)
    return decision, previous


def log_and_register(
    params: PipelineParams,
    bundle_dir: str | os.PathLike,
    metrics: dict,
    history: dict[str, list[float]],
    artifacts: list[Path],
    tags: dict[str, str],
) -> dict:
    """Log one run (params, per-epoch history, metrics, tags, artifacts, model) and register the model.

    ``history`` values are logged with step = epoch index (from 0). The new version takes the
    ``champion`` alias only when its ``register.metric`` strictly beats the current champion's
    (read from the champion's run; a champion without that metric, or no champion, counts as
    beaten); otherwise it takes ``challenger``. The decision and both figures are run tags and
    version tags; the alias moves last. If anything fails before that decision,
    the run is marked FAILED and no alias moves.
    """
    register = params.register
    figures = metric_values(metrics)
    value = figures.get(register.metric)
    if value is None or not math.isfinite(value):
        raise ValueError(
            f"register.metric '{register.metric}' needs a finite number among the evaluation metrics "
            f"{sorted(figures)}, got {value}"
        )
    client = _client()
    experiment_id = ensure_experiment(register.experiment)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        run_id = run.info.run_id
        mlflow.set_tags(tags)
        mlflow.log_params(flatten(params.model_dump(mode="json")))
        now = get_current_time_millis()
        history_points = [
            Metric(key, float(v), now, step) for key, values in history.items() for step, v in enumerate(values)
        ]
        client.log_batch(run_id, metrics=history_points)
        mlflow.log_metrics(figures)
        for path in map(Path, artifacts):
            if not path.exists():
                raise FileNotFoundError(f"{path}: artifact to log does not exist")
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        if not Path(bundle_dir).is_dir():
            raise FileNotFoundError(f"{bundle_dir}: model bundle folder does not exist")
        info = _log_bundle_model(bundle_dir)
        version = mlflow.register_model(info.model_uri, register.model_name).version

        decision, previous = apply_gate(
            client, run_id, register.model_name, str(version), register.metric, value, register.greater_is_better
        )
    return {
        "run_id": run_id,
        "model_name": register.model_name,
        "version": str(version),
        "decision": decision,
        "metric": register.metric,
        "value": value,
        "previous_champion_value": previous,
    }


def log_failed_stage(params: PipelineParams, stage: str, artifacts: list[Path]) -> str:
    """Record a stage that stopped the pipeline as a FAILED run with its report files; returns the run id."""
    with mlflow.start_run(experiment_id=ensure_experiment(params.register.experiment)) as run:
        mlflow.set_tags({"failed_stage": stage})
        mlflow.log_params(flatten(params.model_dump(mode="json")))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        mlflow.end_run(status="FAILED")
    return run.info.run_id


def champion_uri(model_name: str) -> str:
    """The registry URI of the model's current champion."""
    return f"models:/{model_name}@{CHAMPION}"


def _resolve_alias(model_name: str, alias: str = CHAMPION):
    """The model version behind ``alias``, or NoChampionError with what to do."""
    try:
        return _client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise NoChampionError(
            f"no '{alias}' version of registered model '{model_name}' in {tracking_uri()}; "
            "run the training pipeline first to register one"
        ) from None


def load_champion(model_name: str):
    """The champion version of ``model_name`` as a pyfunc model.

    Raises NoChampionError when there is no such registered model or it has no champion yet.
    """
    _resolve_alias(model_name)
    return mlflow.pyfunc.load_model(champion_uri(model_name))


def download_bundle(model_uri: str) -> Path:
    """The model bundle folder of a registered model, e.g. ``models:/name@champion``, downloaded locally."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if alias:
        _resolve_alias(name, alias)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri()))
    return local / "artifacts" / "bundle"


ENROLLED = "enrolled"


def _log_bundle_model(bundle_dir: str | os.PathLike):
    """Log a bundle folder as the pyfunc model ``model`` of the active run, checked to serve its example."""
    from .pyfunc_model import (
        SIGNATURE,
        SiameseBundleModel,
        input_example,
        pip_requirements,
    )

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SiameseBundleModel(),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=_PACKAGE_DIRS,
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=pip_requirements(),
    )
    # MLflow only warns when the input example fails; a model that cannot serve is not registered.
    mlflow.pyfunc.load_model(info.model_uri).predict(input_example())
    return info


def enroll_and_register(model_name: str, folder: str | os.PathLike, source: str = CHAMPION, promote: bool = False) -> dict:
    """Enrol class folders into a registered version's gallery, and register the result as a new version.

    ``source`` is an alias or a version number of ``model_name``. Its bundle is downloaded,
    the images of ``folder`` (``<class>/<image>``) are embedded by its unchanged network and
    added to its gallery, and the enlarged bundle is logged as a new run and model version,
    both tagged ``enrolled_from=<source version>``. The run goes to the source run's experiment.

    Aliases: with ``promote`` the new version becomes ``champion``, without the champion gate
    (the source's test-set figure says nothing about the new classes, so the user decides);
    otherwise it takes ``enrolled`` and the champion stays where it is.
    """
    from siamese_core.data import scan_folder
    from siamese_core.recognizer import SiameseRecognizer

    client = _client()
    base = client.get_model_version(model_name, source) if str(source).isdigit() else _resolve_alias(model_name, source)
    images = scan_folder(folder)
    recognizer = SiameseRecognizer.load(download_bundle(f"models:/{model_name}/{base.version}"))
    known = set(recognizer.gallery.class_names)
    recognizer.enroll(images)
    new_classes = [name for name in recognizer.gallery.class_names if name not in known]
    tags = {"enrolled_from": str(base.version), "enrolled_folder": str(folder)}
    experiment_id = client.get_run(base.run_id).info.experiment_id if base.run_id else ensure_experiment("siamese")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=experiment_id) as run:
        bundle = recognizer.save(Path(tmp) / "bundle", {"enrolled_from": f"{model_name}/{base.version}"})
        mlflow.set_tags(tags)
        mlflow.log_params(flatten(recognizer.config.model_dump(mode="json")))
        mlflow.log_metrics({"gallery_size": len(recognizer.gallery), "classes": len(recognizer.gallery.class_names),
                            "enrolled_images": len(images), "new_classes": len(new_classes)})
        mlflow.log_dict({"folder": str(folder), "new_classes": new_classes,
                         "images": dict(Counter(images.label_names))},
                        "enrolment.json")
        info = _log_bundle_model(bundle)
        version = str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    alias = CHAMPION if promote else ENROLLED
    with _gate_lock():
        client.set_registered_model_alias(model_name, alias, version)
    return {"run_id": run.info.run_id, "model_name": model_name, "version": version, "alias": alias,
            "enrolled_from": str(base.version), "new_classes": new_classes, "gallery_size": len(recognizer.gallery)}
