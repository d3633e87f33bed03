"""The MLflow model registry: versions, the champion gate, aliases, promotion and rollback, model cards.

Aliases: ``champion`` (what the predict flow and serving load), ``previous`` (the champion
it replaced, for rollback), ``challenger`` (a version that did not beat the champion; with
``register.rollout: shadow | canary``, the winner on live traffic, see :mod:`pipelines.rollout`) and
``enrolled`` (a version with an enlarged gallery). Every alias move runs under one lock
and records who moved it, when and why on the version's tags.
"""

from __future__ import annotations

import atexit
import getpass
import hashlib
import logging
import math
import os
import shutil
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from siamese_core.errors import ConfigError
from siamese_core.metrics import flatten
from siamese_core.sharding import Sharder

from .errors import NoChampionError, RegistryError
from .files import tree_sha256
from .params import PipelineParams, RegisterConfig
from .rollout import end as end_rollout
from .rollout import live_plan, plan_for
from .tracking import PipelineRun, client, ensure_experiment, metric_values, tracked_run, tracking_uri

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS, ENROLLED = "champion", "challenger", "previous", "enrolled"
REJECTED = "rejected"  # a gate decision, not an alias: a loser while a shadow or canary rollout holds 'challenger'
# The sha256 of a version's artifacts as registered (files.tree_sha256), kept in the tracking database.
ARTIFACTS_DIGEST_TAG = "artifacts_sha256"
# Written by MLflow into the stored model when the version is registered (its name and number, as YAML data).
_REGISTRATION_FILES = frozenset({"registered_model_meta"})
_PACKAGE_DIRS = [str(Path(__file__).resolve().parents[1] / name) for name in ("siamese_core", "pipelines")]
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
GATE_TIMEOUT_S = 600
MODEL_DESCRIPTION = (
    "Siamese triplet-loss image recogniser: an image gets the class of its nearest gallery image, with the "
    "squared distance. Input: a column `image` of base64-encoded image bytes. Aliases: `champion` (served), "
    "`previous` (the champion before it, for `siamese rollback`), `challenger` (did not beat the champion), "
    "`enrolled` (a gallery enlarged without retraining). Each version's description is its model card."
)


def champion_uri(model_name: str) -> str:
    """The registry URI of the model's current champion."""
    return f"models:/{model_name}@{CHAMPION}"


def alias_version(model_name: str, alias: str = CHAMPION):
    """The model version behind ``alias``, or None when the model or the alias does not exist."""
    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise


def _require_alias(model_name: str, alias: str = CHAMPION):
    """The model version behind ``alias``, or NoChampionError with what to do."""
    version = alias_version(model_name, alias)
    if version is None:
        raise NoChampionError(
            f"no '{alias}' version of registered model '{model_name}' in {tracking_uri()}; "
            "run the training pipeline first to register one"
        )
    return version


def load_champion(model_name: str):
    """The champion version of ``model_name`` as a pyfunc model, its artifacts checked first
    (NoChampionError when there is none, RegistryError when they differ from those registered)."""
    _require_alias(model_name)
    return load_version(champion_uri(model_name))


def load_version(model_uri: str):
    """The pyfunc model of a registered version (``models:/name/3`` or ``models:/name@alias``), its artifacts
    checked first (:func:`verified_download`). The downloaded copy is removed once loaded, whether the load succeeded
    or failed; a bundle whose gallery searches an on-disk index reads it while it answers, so its copy stays until
    the model is released (garbage-collected, or the process ends)."""
    local = verified_download(model_uri)
    try:
        model = _load_pyfunc(local)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    if _reads_its_files(model):
        weakref.finalize(model, shutil.rmtree, local, True)
    else:
        shutil.rmtree(local, ignore_errors=True)
    return model


def _load_pyfunc(local: Path):
    """The pyfunc model in the folder ``local``, with ``sys.path`` as it was: MLflow puts the folder's ``code/`` first
    on it, and a folder about to be removed (in the shared temporary folder) must not stay where imports look."""
    path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(str(local))
    finally:
        sys.path[:] = path


def _reads_its_files(model) -> bool:
    """Whether a loaded version still reads its folder: its gallery is searched through an on-disk index."""
    recognizer = getattr(model.unwrap_python_model(), "recognizer", None)
    return recognizer is not None and recognizer.gallery.ondisk_dir is not None


def download_bundle(model_uri: str) -> Path:
    """The model bundle folder of a registered model, e.g. ``models:/name@champion``, downloaded locally
    and checked against the digest recorded at registration. The copy is removed when the process exits
    (a recogniser loaded from it may read its on-disk index until then); :func:`bundle_copy` removes it sooner.

    A bundle is data, read by safe loaders (no pickle, Keras' safe mode), so a version registered
    before digests were recorded is still read, with a warning; its code never runs from here.
    """
    bundle = _verified_bundle(model_uri)
    atexit.register(shutil.rmtree, bundle.parent.parent, True)
    return bundle


@contextmanager
def bundle_copy(model_uri: str) -> Iterator[Path]:
    """:func:`download_bundle`'s folder for the length of a ``with`` block, removed when it ends."""
    bundle = _verified_bundle(model_uri)
    try:
        yield bundle
    finally:
        shutil.rmtree(bundle.parent.parent, ignore_errors=True)


def _verified_bundle(model_uri: str) -> Path:
    """The bundle folder in a checked download of ``model_uri`` (its files read as data), or RegistryError."""
    local = verified_download(model_uri, unsigned_ok=True)
    if not (local / "artifacts" / "bundle").is_dir():
        shutil.rmtree(local, ignore_errors=True)
        raise RegistryError(f"{model_uri}: the downloaded model holds no bundle (artifacts/bundle); it was not "
                            "registered by this project, or its artifacts are incomplete")
    return local / "artifacts" / "bundle"


def version_of(model_uri: str) -> ModelVersion:
    """The version a ``models:/name/3`` or ``models:/name@alias`` URI names."""
    name, _, rest = model_uri.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    return _require_alias(name, alias) if alias else client().get_model_version(name, version_number(rest))


def verified_download(model_uri: str, unsigned_ok: bool = False) -> Path:
    """A fresh local copy of a registered version (``models:/name/3`` or ``models:/name@alias``) whose files
    match the sha256 recorded on the version when it was registered (tag ``artifacts_sha256``).

    The digest lives in the tracking database, the files in the artifact store: a file changed in the
    store is refused in one line (RegistryError), before any of its code runs, and its copy removed. The
    caller removes the copy it gets.
    """
    version = version_of(model_uri)
    local = _download(f"models:/{version.name}/{version.version}")
    try:
        _check_digest(model_uri, version, tree_sha256(local, _REGISTRATION_FILES), unsigned_ok)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return local


def _check_digest(model_uri: str, version: ModelVersion, found: str, unsigned_ok: bool) -> None:
    """RegistryError unless ``found`` is the digest recorded on ``version`` (a version without one: a warning where
    ``unsigned_ok``)."""
    expected = version.tags.get(ARTIFACTS_DIGEST_TAG)
    if not expected:
        unsigned = (f"{model_uri}: version {version.version} has no '{ARTIFACTS_DIGEST_TAG}' tag (registered before "
                    "digests were recorded), so its files cannot be checked")
        if not unsigned_ok:
            raise RegistryError(f"{unsigned}; if you trust what the artifact store holds, record it with "
                                f"`siamese registry sign {version.name} {version.version}`, or register it again")
        log.warning("%s; its bundle is read as data only", unsigned)
    elif found != expected:
        raise RegistryError(f"{model_uri}: the artifacts of version {version.version} differ from those registered "
                            f"(sha256 {found[:12]}... against {expected[:12]}... recorded); refusing to load them")


def _download(model_uri: str) -> Path:
    """The artifacts of ``model_uri`` in a new private temporary folder (the caller removes it), or a one-line
    RegistryError (and no folder left)."""
    target = Path(tempfile.mkdtemp(prefix="siamese-model-"))
    quiet = logging.getLogger("mlflow.store.artifact.artifact_repo")  # its INFO line when nothing is found
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target), tracking_uri=tracking_uri())
    except Exception as exc:  # the store's own errors (MLflow's, HTTP, boto's): missing objects, no answer
        shutil.rmtree(target, ignore_errors=True)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RegistryError(f"{model_uri}: its artifacts could not be downloaded from the artifact store "
                            f"({type(exc).__name__}: {reason})") from None
    finally:
        quiet.setLevel(level)
    if not any(p.is_file() for p in target.rglob("*")):
        shutil.rmtree(target, ignore_errors=True)
        raise RegistryError(f"{model_uri}: its artifacts could not be downloaded from the artifact store "
                            "(none found where the version points)")
    return target


@contextmanager
def gate_lock(model_name: str):
    """Serialise alias moves of one registered model.

    With a Prefect server (``PREFECT_API_URL``), a Prefect global concurrency limit of 1
    named ``siamese-gate-<model>``: every machine that uses that server shares it. Without
    one, a file lock beside the SQLite store (or in the temp folder), which serialises the
    runs of this machine only.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from prefect.client.orchestration import get_client
        from prefect.concurrency.sync import concurrency
        from prefect.exceptions import PrefectHTTPStatusError

        name = f"siamese-gate-{hashlib.sha256(model_name.encode()).hexdigest()[:16]}"
        with get_client(sync_client=True) as prefect:
            try:
                prefect.upsert_global_concurrency_limit_by_name(name, limit=1)
            except PrefectHTTPStatusError as exc:  # created by another machine a moment ago
                if exc.response.status_code != 409:
                    raise
        with concurrency(name, occupy=1, timeout_seconds=GATE_TIMEOUT_S, strict=True):
            yield
        return
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).with_suffix(".gate.lock")
    else:
        path = Path(tempfile.gettempdir()) / f"siamese-gate-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    with FileLock(path, timeout=GATE_TIMEOUT_S):
        yield


def _record_move(mlflow_client: MlflowClient, model_name: str, version: str, action: str, reason: str) -> None:
    """Tag a version with an alias move: ``<action>.reason``, ``.by`` and ``.at``."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in {"reason": reason, "by": getpass.getuser(), "at": stamp}.items():
        mlflow_client.set_model_version_tag(model_name, version, f"{action}.{key}", value)


def _make_champion(mlflow_client: MlflowClient, model_name: str, version: str, action: str, reason: str) -> str | None:
    """Move ``champion`` to ``version`` and ``previous`` to the old champion; returns the old champion's version."""
    old = alias_version(model_name, CHAMPION)
    mlflow_client.set_registered_model_alias(model_name, CHAMPION, version)
    if old is not None and str(old.version) != str(version):
        mlflow_client.set_registered_model_alias(model_name, PREVIOUS, str(old.version))
        _record_move(mlflow_client, model_name, str(old.version), "demoted", f"{action} of version {version}: {reason}")
    _record_move(mlflow_client, model_name, version, action, reason)
    return None if old is None else str(old.version)


ChampionScorer = Callable[[ModelVersion], "float | None"]


def same_queries_scorer(train_dir: str | os.PathLike, test_dir: str | os.PathLike, metric: str) -> ChampionScorer:
    """Score a champion version as this run's model was scored: its network embeds this run's gallery
    images (``train_dir``) and test queries (``test_dir``), searched with its own settings.

    Returns None for a champion whose gallery serves other classes than ``train_dir`` holds: it belongs
    to another data lineage, and its figures on this data would say nothing about what it serves.
    """

    def score(champion: ModelVersion) -> float | None:
        from siamese_core.data import scan_folder
        from siamese_core.evaluation import evaluate
        from siamese_core.recognizer import SiameseRecognizer

        with bundle_copy(f"models:/{champion.name}/{champion.version}") as bundle:
            recognizer = SiameseRecognizer.load(bundle)
            gallery = scan_folder(train_dir)
            if sorted(recognizer.gallery.class_names) != sorted(gallery.class_names):
                return None
            scores = evaluate(recognizer.with_gallery(gallery), test_dir, recognizer.config.evaluate.top_k)
        return float(scores.to_dict()[metric])

    return score


def _decide(champion: ModelVersion | None, value: float, metric: str, greater_is_better: bool,
            score_champion: ChampionScorer, baselines: dict | None) -> tuple[bool, float | None, str]:
    """Whether the new version becomes champion, the champion's figure on the same queries, and why, in words."""
    if baselines is not None and not baselines.get("passed"):
        return False, None, baselines.get("sentence", "it does not beat its baselines")
    if champion is None:
        return True, None, f"{metric} {value:.4f}; there was no champion before"
    previous = score_champion(champion)
    if previous is None:
        return True, None, (f"champion version {champion.version} serves other classes (another data lineage), so the "
                            f"two are not compared; this version serves this data and beats its baselines, and "
                            f"version {champion.version} stays reachable as 'previous'")
    wins = value > previous if greater_is_better else value < previous
    return wins, previous, (f"{metric} {value:.4f} against champion version {champion.version}'s {previous:.4f} "
                            f"on the same test queries and gallery: {'better' if wins else 'not better'}")


def apply_gate(
    mlflow_client: MlflowClient, run_id: str, model_name: str, version: str, metric: str, value: float,
    greater_is_better: bool, score_champion: ChampionScorer, baselines: dict | None = None, rollout=None,
) -> tuple[str, float | None, str]:
    """Give ``version`` the champion alias if it beats its baselines and the champion on the same queries, else challenger.

    With a ``rollout`` plan (:class:`pipelines.rollout.Plan`, shadow or canary) a winner that has a champion to
    replace takes ``challenger`` with the plan as tags, and reaches ``champion`` through ``siamese promote`` once it
    has live evidence; a loser then takes no alias (the challenger's place is the live rollout's) and its decision is
    ``rejected``. The first version of a model becomes champion in every mode.

    ``score_champion(champion)`` scores the current champion on this run's queries (None: it serves other
    classes, and a version that beats its baselines replaces it); ``baselines`` is the evaluation's
    ``baseline_check``. The read-compare-move runs under a lock, so two runs finishing at once cannot both
    compare against the same old champion and leave the worse one in place. The replaced champion keeps
    the alias ``previous``. The decision, both figures and the reason are logged on run ``run_id`` and on
    the version. Returns ``(decision, champion's figure on the same queries, reason)``.
    """
    with gate_lock(model_name):
        champion = alias_version(model_name, CHAMPION)
        wins, previous, reason = _decide(champion, value, metric, greater_is_better, score_champion, baselines)
        staged = rollout is not None and rollout.mode != "direct"
        if not wins:
            decision = REJECTED if staged else CHALLENGER
        elif staged and previous is not None:  # a champion of the same data to replace: live traffic first
            decision = CHALLENGER
        else:
            decision = CHAMPION
        if decision == CHALLENGER and staged:
            reason = (f"{reason}; in {rollout.mode} rollout: `siamese rollout status` shows its live evidence, "
                      "`siamese promote` makes it champion")
        gate = {
            "gate.decision": decision,
            "gate.reason": reason,
            "gate.metric": metric,
            "gate.value": str(value),
            "gate.previous_champion_version": str(None if champion is None else champion.version),
            "gate.previous_champion_value": str(previous),
        }
        for key, tag in gate.items():
            mlflow_client.set_tag(run_id, key, tag)
            mlflow_client.set_model_version_tag(model_name, version, key, tag)
        if previous is not None:
            mlflow_client.log_metric(run_id, f"previous_champion.{metric}", previous)
        if decision == CHAMPION:
            _make_champion(mlflow_client, model_name, version, "gate", reason)
        elif decision == CHALLENGER:
            replaced = alias_version(model_name, CHALLENGER)
            if staged and live_plan(replaced) is not None:  # a newer winner takes the live rollout's place
                end_rollout(mlflow_client, model_name, str(replaced.version), "replaced")
            mlflow_client.set_registered_model_alias(model_name, CHALLENGER, version)
            if staged:
                for key, tag in rollout.tags().items():
                    mlflow_client.set_model_version_tag(model_name, version, key, tag)
    return decision, previous, reason


def version_number(version: str | int) -> str:
    """A model version as MLflow writes it (``"03"`` is ``"3"``); RegistryError unless a positive whole number."""
    text = str(version).strip()
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise RegistryError(f"a model version is a positive whole number, got '{str(version)[:40]}'")
    return str(int(text))


def set_champion(model_name: str, version: str, reason: str, action: str = "promote", rollout_mode: str = "direct",
                 force: bool = False) -> dict:
    """Make ``version`` the champion by hand, recording ``reason``; the old champion becomes ``previous``.

    A promote in shadow or canary mode (``rollout_mode``, or a live rollout of the model) needs the challenger's live
    evidence (:func:`pipelines.rollout.check_promotion`) unless ``force``; the evidence is recorded on the version
    and its rollout ends."""
    from . import rollout

    if not reason.strip():
        raise RegistryError("a reason is required: it is recorded on the version")
    version = version_number(version)
    mlflow_client = client()
    try:
        mlflow_client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise NoChampionError(f"registered model '{model_name}' has no version {version} in {tracking_uri()}") from None
        raise
    _check_files(model_name, version, "promoted" if action == "promote" else "rolled back")
    with gate_lock(model_name):
        current = alias_version(model_name, CHAMPION)
        if current is not None and str(current.version) == str(version):
            raise RegistryError(f"version {version} of '{model_name}' is already the champion")
        evidence = rollout.check_promotion(model_name, version, rollout_mode, force) if action == "promote" else None
        old = _make_champion(mlflow_client, model_name, str(version), action, reason)
        rollout.finish(model_name, version, evidence)
    return {"model_name": model_name, "champion": str(version), "previous": old, "reason": reason, "evidence": evidence}


def _check_files(model_name: str, version: str, done: str) -> None:
    """RegistryError (``not <done>: ...``) unless the stored files of ``version`` match the digest recorded at
    registration: a server would refuse to load it, so it does not become champion."""
    try:
        shutil.rmtree(verified_download(f"models:/{model_name}/{version}"), ignore_errors=True)
    except RegistryError as exc:
        raise RegistryError(f"not {done}: {exc}; the champion stays where it is") from None


STALE_REGISTRATION_S = 3600  # a version this old with no gate decision was left by a registration that died


def repair(model_name: str, older_than_s: float = STALE_REGISTRATION_S) -> list[str]:
    """Mark what registrations killed midway left: versions of ``model_name`` older than ``older_than_s``
    seconds with no gate decision (and not enrolled) get the tag ``registration=incomplete``, and their
    runs, if still RUNNING, end FAILED. Returns the versions marked; a younger version may still be
    registering, and is left alone."""
    mlflow_client = client()
    now_ms = datetime.now(UTC).timestamp() * 1000
    marked = []
    for version in mlflow_client.search_model_versions(f"name = '{model_name}'"):
        tags = version.tags or {}
        if "gate.decision" in tags or "enrolled_from" in tags or tags.get("registration") == "incomplete":
            continue
        if now_ms - (version.creation_timestamp or now_ms) < older_than_s * 1000:
            continue
        mlflow_client.set_model_version_tag(model_name, version.version, "registration", "incomplete")
        if version.run_id and mlflow_client.get_run(version.run_id).info.status == "RUNNING":
            mlflow_client.set_tag(version.run_id, "error", f"registration of version {version.version} was interrupted")
            mlflow_client.set_terminated(version.run_id, "FAILED")
        marked.append(str(version.version))
    return marked


def sign(model_name: str, version: str) -> str:
    """Record the sha256 of a version's stored files (tag ``artifacts_sha256``) for a version registered
    before digests were recorded: trust on first use, by hand. A version that has one keeps it."""
    found = version_of(f"models:/{model_name}/{version_number(version)}")
    if found.tags.get(ARTIFACTS_DIGEST_TAG):
        raise RegistryError(f"version {found.version} of {model_name} already has its digest; nothing to do")
    local = _download(f"models:/{model_name}/{found.version}")
    try:
        digest = tree_sha256(local, _REGISTRATION_FILES)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    client().set_model_version_tag(model_name, found.version, ARTIFACTS_DIGEST_TAG, digest)
    return digest


def rollback(model_name: str, reason: str) -> dict:
    """Make the ``previous`` version the champion again; the one rolled back becomes ``previous``."""
    return set_champion(model_name, str(_require_alias(model_name, PREVIOUS).version), reason, "rollback")


def _log_bundle_model(run_id: str, bundle_dir: str | os.PathLike) -> tuple[str, str]:
    """Log a bundle folder as the pyfunc model ``model`` of run ``run_id`` (models-from-code, no pickle),
    checked to serve its example. Returns its model URI and the sha256 of its artifacts as stored."""
    from .pyfunc_model import SIGNATURE, input_example, pip_requirements

    if not Path(bundle_dir).is_dir():
        raise FileNotFoundError(f"{bundle_dir}: model bundle folder does not exist")
    if Path(bundle_dir).name != "bundle":  # MLflow stores the folder under its own name; readers look for bundle/
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(bundle_dir, Path(tmp) / "bundle")
            return _log_bundle_model(run_id, Path(tmp) / "bundle")
    mlflow_client = client()
    logged = mlflow_client.create_logged_model(  # in the run's experiment, its artifacts where the run's are
        experiment_id=mlflow_client.get_run(run_id).info.experiment_id, name="model", source_run_id=run_id)
    info = mlflow.models.Model.log(
        None,
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=logged.model_id,
        python_model=str(Path(__file__).with_name("served_model.py")),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=_PACKAGE_DIRS,
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=pip_requirements(),
    )
    stored = _download(info.model_uri)
    try:
        digest = tree_sha256(stored, _REGISTRATION_FILES)
        # MLflow only warns when the input example fails; a model that cannot serve is not registered.
        _load_pyfunc(stored).predict(input_example())
    finally:
        shutil.rmtree(stored, ignore_errors=True)
    return info.model_uri, digest


def register_bundle(run_id: str, model_name: str, bundle_dir: str | os.PathLike, tags: dict[str, str] | None = None) -> str:
    """Log ``bundle_dir`` as the model of run ``run_id`` and register it as a new version of ``model_name``,
    with the sha256 of its stored files (tag ``artifacts_sha256``). Returns the version; moves no alias."""
    model_uri, digest = _log_bundle_model(run_id, bundle_dir)
    mlflow_client = client()
    version = str(mlflow.register_model(model_uri, model_name, tags={**(tags or {}), ARTIFACTS_DIGEST_TAG: digest}).version)
    if not mlflow_client.get_registered_model(model_name).description:
        mlflow_client.update_registered_model(model_name, MODEL_DESCRIPTION)
    return version


def log_and_register(
    run: PipelineRun,
    params: PipelineParams,
    bundle_dir: str | os.PathLike,
    metrics: dict,
    artifacts: list[Path],
    tags: dict[str, str],
    *,
    score_champion: ChampionScorer,
    baselines: dict | None = None,
) -> dict:
    """Log the evaluation and artifacts to ``run``, register the bundle and apply the champion gate.

    The new version takes ``champion`` only when it beats its baselines (``baselines``, the evaluation's
    ``baseline_check``) and its ``register.metric`` strictly beats the current champion's on the same
    queries (``score_champion``, see :func:`apply_gate`), else ``challenger``. The run stays open: its
    owner (:func:`pipelines.tracking.pipeline_run`) ends it, FAILED if anything here fails.
    """
    register = params.register
    figures = metric_values(metrics)
    value = figures.get(register.metric)
    if value is None or not math.isfinite(value):
        raise ConfigError(
            f"register.metric '{register.metric}' needs a finite number among the evaluation metrics "
            f"{sorted(figures)}, got {value}"
        )
    for left in repair(register.model_name):
        log.warning("version %s of %s was left by an interrupted registration: tagged registration=incomplete",
                    left, register.model_name)
    run.set_tags(tags)
    run.log_metrics(figures)
    for path in map(Path, artifacts):
        run.log_artifact(path)
    version = register_bundle(run.run_id, register.model_name, bundle_dir)
    decision, previous, reason = apply_gate(
        run.client, run.run_id, register.model_name, version, register.metric, value, register.greater_is_better,
        score_champion, baselines, plan_for(register, version))
    return {
        "run_id": run.run_id,
        "run_name": run.info.run_name,
        "model_name": register.model_name,
        "version": version,
        "decision": decision,
        "metric": register.metric,
        "value": value,
        "previous_champion_value": previous,
        "reason": reason,
    }


def describe_version(model_name: str, version: str, text: str) -> None:
    """Set a version's description (its model card)."""
    client().update_model_version(model_name, version, description=text)


def enroll_and_register(model_name: str, folder: str | os.PathLike, source: str = CHAMPION, promote: bool = False,
                        sharder: Sharder | None = None, register: RegisterConfig | None = None) -> dict:
    """Enrol class folders into a registered version's gallery, and register the result as a new version.

    ``source`` is an alias or a version number of ``model_name``. Its bundle is downloaded,
    the images of ``folder`` (``<class>/<image>``) are embedded by its unchanged network and
    added to its gallery, and the enlarged bundle is logged as a new run and model version,
    both tagged ``enrolled_from=<source version>``. The run goes to the source run's experiment.

    Aliases: without ``promote`` the new version takes ``enrolled`` and the champion stays where it is. With
    ``promote`` it goes the way to champion that ``register.rollout`` sets, without the champion gate (the source's
    test-set figure says nothing about the new classes, so the user decides): in direct mode it becomes ``champion``;
    in shadow or canary mode it becomes the ``challenger`` of a new rollout, and reaches champion on its live evidence.
    While a rollout is live, ``promote`` is refused (RegistryError) before anything is enrolled.
    """
    from siamese_core.data import scan_folder
    from siamese_core.recognizer import SiameseRecognizer

    if promote:
        _refuse_during_rollout(model_name)
    mlflow_client = client()
    base = (mlflow_client.get_model_version(model_name, source) if str(source).isdigit()
            else _require_alias(model_name, source))
    images = scan_folder(folder)
    tags = {"enrolled_from": str(base.version), "enrolled_folder": str(folder)}
    experiment_id = mlflow_client.get_run(base.run_id).info.experiment_id if base.run_id else ensure_experiment("siamese")
    run_name = f"enrol-{Path(folder).name}-into-v{base.version}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    with bundle_copy(f"models:/{model_name}/{base.version}") as source_bundle, tempfile.TemporaryDirectory() as tmp:
        recognizer = SiameseRecognizer.load(source_bundle, sharder)
        known = set(recognizer.gallery.class_names)
        recognizer.enroll(images)
        new_classes = [name for name in recognizer.gallery.class_names if name not in known]
        with tracked_run(lambda: PipelineRun.create(experiment_id, run_name, tags)) as scope:
            scope.stage = "enrol"
            run = scope.run
            bundle = recognizer.save(Path(tmp) / "bundle", {"enrolled_from": f"{model_name}/{base.version}"})
            run.client.log_batch(run.run_id, params=[
                Param(key, str(value)) for key, value in flatten(recognizer.config.model_dump(mode="json")).items()])
            run.log_metrics({"gallery_size": len(recognizer.gallery), "classes": len(recognizer.gallery.class_names),
                             "enrolled_images": len(images), "new_classes": len(new_classes)})
            run.client.log_dict(run.run_id, {"folder": str(folder), "new_classes": new_classes,
                                             "images": dict(Counter(images.label_names))}, "enrolment.json")
            version = register_bundle(run.run_id, model_name, bundle, tags)
            describe_version(model_name, version, (
                f"Version {base.version} with {len(images)} images of `{folder}` enrolled into its gallery "
                f"(new classes: {', '.join(new_classes) or 'none'}). Same network, no retraining."))
    reason = f"enrolled {folder} into version {base.version}"
    with gate_lock(model_name):
        staged = (plan_for(register, version) if promote and register is not None and register.rollout != "direct"
                  and alias_version(model_name, CHAMPION) is not None else None)
        if promote:
            _refuse_during_rollout(model_name, version)
        if staged is not None:
            mlflow_client.set_registered_model_alias(model_name, CHALLENGER, version)
            for key, tag in staged.tags().items():
                mlflow_client.set_model_version_tag(model_name, version, key, tag)
            _record_move(mlflow_client, model_name, version, "staged", reason)
        elif promote:
            _make_champion(mlflow_client, model_name, version, "promote", reason)
        else:
            mlflow_client.set_registered_model_alias(model_name, ENROLLED, version)
    return {"run_id": run.run_id, "model_name": model_name, "version": version,
            "alias": CHALLENGER if staged else CHAMPION if promote else ENROLLED, "enrolled_from": str(base.version),
            "rollout": None if staged is None else staged.mode, "new_classes": new_classes,
            "gallery_size": len(recognizer.gallery)}


def _refuse_during_rollout(model_name: str, enrolled: str | None = None) -> None:
    """RegistryError while a shadow or canary rollout of ``model_name`` is live: a version made champion beside it
    would skip its evidence. An ``enrolled`` version already registered takes the alias ``enrolled`` first."""
    live = live_plan(alias_version(model_name, CHALLENGER))
    if live is None:
        return
    kept = ""
    if enrolled is not None:
        client().set_registered_model_alias(model_name, ENROLLED, enrolled)
        kept = f"version {enrolled} took the alias '{ENROLLED}'; "
    raise RegistryError(f"not promoted: version {live.version} of '{model_name}' is live as challenger in a {live.mode} "
                        f"rollout, and every way to champion goes through it; {kept}enrol without --promote (alias "
                        f"'{ENROLLED}') and promote once the rollout has ended (`siamese rollout status`)")
