"""The MLflow model registry: every read and write of versions and aliases, calling the pure rules of
:mod:`pipelines.gate` (the champion gate) and :mod:`pipelines.rollout` (plans, tallies, evidence).

Aliases: ``champion`` (what the predict flow and serving load), ``previous`` (the champion
it replaced, for rollback), ``challenger`` (a version that did not beat the champion; with
``register.rollout: shadow | canary``, the winner on live traffic, see :mod:`pipelines.rollout`) and
``enrolled`` (a version with an enlarged gallery). Every alias move runs under one lock
and records who moved it, when and why on the version's tags. What a version is (its files' digest, its
code's identity, its download) is :mod:`pipelines.integrity`'s.
"""

from __future__ import annotations

import atexit
import getpass
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from siamese_core.data import scan_folder
from siamese_core.errors import ConfigError

from . import integrity
from .errors import NoChampionError, RegistryError
from .gate import CHALLENGER, CHAMPION, ENROLLED, PREVIOUS, Decision, Scores, decide
from .inference_log import ModelIdentity
from .params import PipelineParams, RegisterConfig
from .pyfunc_model import SIGNATURE, encode_image, input_example, pip_requirements
from .rollout import PLAN_PREFIX, Plan, evidence, live_plan, now, plan_for, pooled, signing_key
from .tracking import PipelineRun, client, metric_values, tracking_uri

log = logging.getLogger(__name__)
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
GATE_TIMEOUT_S = 600
MODEL_DESCRIPTION = (
    "Siamese triplet-loss image recogniser: an image gets the class of its nearest gallery image, with the "
    "squared distance. Input: a column `image` of base64-encoded image bytes. Aliases: `champion` (served), "
    "`previous` (the champion before it, for `siamese rollback`), `challenger` (did not beat the champion, or, in a "
    "shadow or canary rollout, the winner on live traffic), `enrolled` (a gallery enlarged without retraining). Each "
    "version's description is its model card."
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


def load_version(model_uri: str, code_mismatch: str = "warn"):
    """The pyfunc model of a registered version (``models:/name/3`` or ``models:/name@alias``), its artifacts
    checked first (:func:`verified_download`) and its code compared with the code this process runs
    (:func:`pipelines.integrity.check_code`: ``code_mismatch`` warn or refuse). The downloaded copy is removed once
    loaded, whether the load succeeded or failed; a bundle whose gallery searches an on-disk index reads it while it
    answers, so its copy stays until the model is released (garbage-collected, or the process ends)."""
    version = version_of(model_uri)
    integrity.check_code(version, code_mismatch)
    local = integrity.checked_download(model_uri, version)
    try:
        model = integrity.load_pyfunc(local)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    if _reads_its_files(model):
        weakref.finalize(model, shutil.rmtree, local, True)
    else:
        shutil.rmtree(local, ignore_errors=True)
    return model


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


def model_identity(model_uri: str) -> ModelIdentity:
    """Which model ``models:/NAME@alias``, ``models:/NAME/3`` or a local bundle folder is, as the inference log
    records it (a folder's version is "local")."""
    if not model_uri.startswith("models:/"):
        return ModelIdentity(name=os.path.basename(os.path.normpath(model_uri)), version="local")
    version = version_of(model_uri)
    return ModelIdentity(name=version.name, version=str(version.version), alias=model_uri.partition("@")[2] or None)


def verified_download(model_uri: str, unsigned_ok: bool = False) -> Path:
    """A fresh local copy of a registered version (``models:/name/3`` or ``models:/name@alias``) whose files
    match the sha256 recorded on the version when it was registered (tag ``artifacts_sha256``).

    The digest lives in the tracking database, the files in the artifact store: a file changed in the
    store is refused in one line (RegistryError), before any of its code runs, and its copy removed. The
    caller removes the copy it gets.
    """
    return integrity.checked_download(model_uri, version_of(model_uri), unsigned_ok)


@contextmanager
def gate_lock(model_name: str):
    """Serialise alias moves of one registered model.

    With a Prefect server (``PREFECT_API_URL``), a Prefect global concurrency limit of 1
    named ``siamese-gate-<model>``: every machine that uses that server shares it. Without
    one, a file lock beside the SQLite store (or in the temp folder), which serialises the
    runs of this machine only.
    """
    from prefect.settings import PREFECT_API_URL  # Prefect takes seconds to import: only where a lock is taken

    if PREFECT_API_URL.value():
        # the same lazy Prefect, for the server's concurrency limit
        from prefect.client.orchestration import get_client
        from prefect.concurrency.sync import concurrency
        from prefect.exceptions import ObjectAlreadyExists

        name = f"siamese-gate-{hashlib.sha256(model_name.encode()).hexdigest()[:16]}"
        with get_client(sync_client=True) as prefect:
            try:  # Prefect's upsert reads, then creates: two gates at once can both find no limit
                prefect.upsert_global_concurrency_limit_by_name(name, limit=1)
            except ObjectAlreadyExists:  # the other one created it a moment ago: the same limit of 1
                pass
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


ChampionScorer = Callable[[ModelVersion], "Scores | None"]


def apply_gate(
    mlflow_client: MlflowClient, run_id: str, model_name: str, version: str, metric: str, value: float,
    greater_is_better: bool, score_champion: ChampionScorer, baselines: dict | None = None, rollout: Plan | None = None,
) -> tuple[str, float | None, str]:
    """Apply the champion gate (:func:`pipelines.gate.decide`) to ``version``, whose ``metric`` is ``value``.

    ``score_champion(champion)`` scores the current champion on the queries both serve
    (:func:`pipelines.scoring.same_queries_scorer`); it runs before the lock is taken, so a registration scoring a
    champion holds no one up. Under the lock the champion is read again: if it moved meanwhile, the new one is scored
    (outside the lock) and the gate decides again; so the read-decide-move is atomic, and two runs finishing at once
    cannot leave the worse one in place. ``baselines`` is the evaluation's ``baseline_check``; ``rollout`` the plan of a
    shadow or canary rollout, whose winner takes ``challenger`` with the plan as tags (a loser: no alias, ``rejected``).

    The replaced champion keeps the alias ``previous``. The decision, both figures and the reason are logged on run
    ``run_id`` and on the version. Returns ``(decision, champion's figure on the shared queries, reason)``.
    """
    mode = "direct" if rollout is None else rollout.mode
    champion = alias_version(model_name, CHAMPION)
    compared = baselines is None or bool(baselines.get("passed"))  # a version that fails its baselines is not compared
    while True:
        scores = score_champion(champion) if champion is not None and compared else None
        with gate_lock(model_name):
            current = alias_version(model_name, CHAMPION)
            if (current and current.version) == (champion and champion.version):
                found = decide(None if champion is None else str(champion.version), value, scores, metric,
                               greater_is_better, baselines, mode)
                _record_decision(mlflow_client, run_id, model_name, version, metric, value, champion, found)
                _move_for(mlflow_client, model_name, version, found, rollout)
                return found.decision, found.previous, found.reason
        champion = current  # it moved while the old one was scored


def _record_decision(mlflow_client: MlflowClient, run_id: str, model_name: str, version: str, metric: str,
                     value: float, champion: ModelVersion | None, found: Decision) -> None:
    gate = {
        "gate.decision": found.decision,
        "gate.reason": found.reason,
        "gate.metric": metric,
        "gate.value": str(value),
        "gate.previous_champion_version": str(None if champion is None else champion.version),
        "gate.previous_champion_value": str(found.previous),
    }
    for key, tag in gate.items():
        mlflow_client.set_tag(run_id, key, tag)
        mlflow_client.set_model_version_tag(model_name, version, key, tag)
    if found.previous is not None:
        mlflow_client.log_metric(run_id, f"previous_champion.{metric}", found.previous)


def _move_for(mlflow_client: MlflowClient, model_name: str, version: str, found: Decision, rollout: Plan | None) -> None:
    """Move the aliases a gate decision gives ``version``."""
    if found.decision == CHAMPION:
        _make_champion(mlflow_client, model_name, version, "gate", found.reason)
    elif found.decision == CHALLENGER:
        staged = rollout if rollout is not None and rollout.mode != "direct" else None
        replaced = alias_version(model_name, CHALLENGER)
        if staged is not None and live_plan(replaced) is not None:  # a newer winner takes the live rollout's place
            end_rollout(mlflow_client, model_name, str(replaced.version), "replaced")
        mlflow_client.set_registered_model_alias(model_name, CHALLENGER, version)
        if staged is not None:
            for key, tag in staged.tags().items():
                mlflow_client.set_model_version_tag(model_name, version, key, tag)


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
    evidence (:func:`check_promotion`) unless ``force``; the evidence is recorded on the version
    and its rollout ends."""
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
        found = check_promotion(model_name, version, rollout_mode, force) if action == "promote" else None
        old = _make_champion(mlflow_client, model_name, str(version), action, reason)
        _finish_rollout(mlflow_client, model_name, version, found)
    return {"model_name": model_name, "champion": str(version), "previous": old, "reason": reason, "evidence": found}


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
        run = PipelineRun(version.run_id) if version.run_id else None
        if run is not None and run.is_open:  # ended FAILED by the one lifecycle, as any failed run
            run.end(RegistryError(f"registration of version {version.version} was interrupted"), "register")
        marked.append(str(version.version))
    return marked


def sign(model_name: str, version: str) -> str:
    """Record the sha256 of a version's stored files (tag ``artifacts_sha256``) for a version registered
    before digests were recorded: trust on first use, by hand. A version that has one keeps it."""
    found = version_of(f"models:/{model_name}/{version_number(version)}")
    if found.tags.get(integrity.ARTIFACTS_DIGEST_TAG):
        raise RegistryError(f"version {found.version} of {model_name} already has its digest; nothing to do")
    local = integrity.download(f"models:/{model_name}/{found.version}")
    try:
        digest = integrity.stored_digest(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    client().set_model_version_tag(model_name, found.version, integrity.ARTIFACTS_DIGEST_TAG, digest)
    return digest


def rollback(model_name: str, reason: str) -> dict:
    """Make the ``previous`` version the champion again; the one rolled back becomes ``previous``."""
    return set_champion(model_name, str(_require_alias(model_name, PREVIOUS).version), reason, "rollback")


def _log_bundle_model(run_id: str, bundle_dir: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """Log a bundle folder as the pyfunc model ``model`` of run ``run_id`` (models-from-code, no pickle),
    checked to serve its example. Returns its model URI and the tags of what was stored: the sha256 of its
    artifacts and the identity of its code."""
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
        code_paths=[str(path) for path in integrity.PACKAGE_DIRS],
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=pip_requirements(),
    )
    stored = integrity.download(info.model_uri)
    try:
        tags = {**integrity.code_tags(stored), integrity.ARTIFACTS_DIGEST_TAG: integrity.stored_digest(stored)}
        # MLflow only warns when the input example fails; a model that cannot serve is not registered.
        integrity.load_pyfunc(stored).predict(input_example())
    finally:
        shutil.rmtree(stored, ignore_errors=True)
    return info.model_uri, tags


def register_bundle(run_id: str, model_name: str, bundle_dir: str | os.PathLike, tags: dict[str, str] | None = None) -> str:
    """Log ``bundle_dir`` as the model of run ``run_id`` and register it as a new version of ``model_name``,
    with the sha256 of its stored files (tag ``artifacts_sha256``) and the identity of its code (``code.version``,
    ``code.sha256``: :func:`pipelines.integrity.code_tags`). Returns the version; moves no alias."""
    model_uri, stored = _log_bundle_model(run_id, bundle_dir)
    mlflow_client = client()
    version = str(mlflow.register_model(model_uri, model_name, tags={**(tags or {}), **stored}).version)
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
    card: Callable[[dict], str] | None = None,
) -> dict:
    """Log the evaluation and artifacts to ``run``, register the bundle, apply the champion gate and describe the
    version with ``card(result)`` (its model card).

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
    info = run.info
    result = {
        "run_id": run.run_id,
        "run_name": info.run_name,
        "experiment_id": info.experiment_id,
        "model_name": register.model_name,
        "version": version,
        "decision": decision,
        "metric": register.metric,
        "value": value,
        "previous_champion_value": previous,
        "reason": reason,
    }
    if card is not None:
        describe_version(register.model_name, version, card(result))
    return result


def sample_prediction(params: PipelineParams) -> dict:
    """The champion's answer for the first test image, loaded and asked as a served model is."""
    test = scan_folder(params.data.test_dir)
    champion = load_champion(params.register.model_name)
    answer = champion.predict(pd.DataFrame({"image": [encode_image(test.paths[0])]})).iloc[0]
    return {"image": test.paths[0], "true_label": test.label_names[0],
            "label": answer["label"], "distance": float(answer["distance"])}


def describe_version(model_name: str, version: str, text: str) -> None:
    """Set a version's description (its model card)."""
    client().update_model_version(model_name, version, description=text)


def place_enrolled(model_name: str, version: str, promote: bool, register: RegisterConfig | None, reason: str):
    """Give an enrolled ``version`` its alias, under the gate's lock: ``enrolled``; with ``promote``, the way to
    champion ``register.rollout`` sets (``champion`` in direct mode, else the ``challenger`` of a new rollout, whose
    plan it returns). RegistryError while another rollout is live (the version then keeps ``enrolled``)."""
    mlflow_client = client()
    with gate_lock(model_name):
        staged = (plan_for(register, version) if promote and register is not None and register.rollout != "direct"
                  and alias_version(model_name, CHAMPION) is not None else None)
        if promote:
            refuse_during_rollout(model_name, version)
        if staged is not None:
            mlflow_client.set_registered_model_alias(model_name, CHALLENGER, version)
            for key, tag in staged.tags().items():
                mlflow_client.set_model_version_tag(model_name, version, key, tag)
            _record_move(mlflow_client, model_name, version, "staged", reason)
        elif promote:
            _make_champion(mlflow_client, model_name, version, "promote", reason)
        else:
            mlflow_client.set_registered_model_alias(model_name, ENROLLED, version)
    return staged


def refuse_during_rollout(model_name: str, enrolled: str | None = None) -> None:
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


def end_rollout(mlflow_client, model_name: str, version: str, state: str, details: dict[str, str] | None = None) -> None:
    """Record on ``version`` that its rollout ended (``state``: promoted, rolled_back or replaced), with ``details``
    as further ``rollout.`` tags; no replica serves it as challenger after this."""
    for key, value in {"state": state, **(details or {})}.items():
        mlflow_client.set_model_version_tag(model_name, str(version), PLAN_PREFIX + key, value)


def roll_back(model_name: str, version: str, reason: str, by: str) -> bool:
    """End the live rollout of ``version`` (the alias ``challenger`` leaves it, its state becomes ``rolled_back``), under
    the gate's lock; False when another replica or a promote ended it first."""
    with gate_lock(model_name):
        current = alias_version(model_name, CHALLENGER)
        if current is None or str(current.version) != str(version) or live_plan(current) is None:
            return False
        mlflow_client = client()
        # The state first: a reader that finds the alias gone then also finds why.
        end_rollout(mlflow_client, model_name, version, "rolled_back",
            {"rolled_back.reason": reason, "rolled_back.by": by, "rolled_back.at": now()})
        mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
    log.warning("%s version %s rolled back: %s", model_name, version, reason)
    return True


def rollout_status(model_name: str) -> dict:
    """The champion, the challenger and its live plan, the pooled counts and what promotion still lacks."""
    champion, challenger = alias_version(model_name, CHAMPION), alias_version(model_name, CHALLENGER)
    plan = live_plan(challenger)
    found: dict = {"model_name": model_name, "champion": None if champion is None else str(champion.version),
                   "challenger": None if challenger is None else str(challenger.version),
                   "mode": None if plan is None else plan.mode, "plan": None if plan is None else asdict(plan)}
    if plan is not None:
        found["counts"] = pooled(challenger, signing_key())
        found["missing"] = evidence(plan, found["counts"])
    return found


def check_promotion(model_name: str, version: str, mode: str, force: bool) -> dict | None:
    """Before ``siamese promote``: in shadow or canary mode, the live evidence the challenger ``version`` has, or
    RegistryError saying what it lacks (``force``: promote anyway, recording that). Returns the evidence to record."""
    found = rollout_status(model_name)
    if mode == "direct" and found["plan"] is None:
        return None
    if found["challenger"] != str(version) or found["plan"] is None:
        missing = [f"version {version} is not the challenger of a live rollout, so it has no live-traffic evidence"]
    else:
        missing = found["missing"]
    unverified = (found.get("counts") or {}).get("unverified")
    if missing and not force:
        left_out = f" (left out, no valid signature: the tallies of {', '.join(unverified)})" if unverified else ""
        raise RegistryError(f"not promoted: {'; '.join(missing)}{left_out}. Check with `siamese rollout status`, or "
                            "promote anyway with --force")
    return {"mode": found["mode"] or mode, "forced": bool(missing), "missing": missing, "counts": found.get("counts")}


def _finish_rollout(mlflow_client: MlflowClient, model_name: str, version: str, evidence_found: dict | None) -> None:
    """After a promote: record the evidence on the version and end its rollout (alias ``challenger`` removed)."""
    if evidence_found is not None:
        mlflow_client.set_model_version_tag(model_name, str(version), "promote.evidence",
                                            json.dumps(evidence_found, sort_keys=True)[:4900])
    current = alias_version(model_name, CHALLENGER)
    if current is not None and str(current.version) == str(version):
        end_rollout(mlflow_client, model_name, version, "promoted")  # the state first, as in roll_back
        mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
