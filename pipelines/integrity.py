"""What a registered version is: the sha256 of its stored files, the identity of the code that serves it, and its
download from the artifact store (checked by :mod:`pipelines.registry` before anything loads).

The code: a version stores the project's packages (models-from-code), but MLflow's loader only puts them on
``sys.path``; a process that has already imported the packages, as ``siamese serve`` has, answers with its own copy,
while ``mlflow models serve`` (a fresh process) runs the stored one. So a version records, at registration, the
package version and the sha256 of the ``.py`` files it stores (:func:`code_tags`, read from the stored copy);
``siamese serve`` compares them with the code it runs (:func:`check_code`) and warns in one line, or refuses
(``serving.code_mismatch``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

import siamese_core

from .errors import RegistryError
from .files import tree_sha256
from .tracking import tracking_uri

log = logging.getLogger(__name__)
# The sha256 of a version's artifacts as registered (files.tree_sha256), kept in the tracking database.
ARTIFACTS_DIGEST_TAG = "artifacts_sha256"
CODE_DIGEST_TAG, CODE_VERSION_TAG = "code.sha256", "code.version"
PACKAGE = "siamese-recognizer"
# Written by MLflow into the stored model when the version is registered (its name and number, as YAML data).
REGISTRATION_FILES = frozenset({"registered_model_meta"})
# The packages a version stores as its code, and the ones this process runs.
PACKAGE_DIRS = (Path(siamese_core.__file__).resolve().parent, Path(__file__).resolve().parent)


def stored_digest(local: Path) -> str:
    """The sha256 of a downloaded version's files, as recorded at registration."""
    return tree_sha256(local, REGISTRATION_FILES)


def checked_download(model_uri: str, version: ModelVersion, unsigned_ok: bool = False) -> Path:
    """A fresh local copy of ``version`` (named ``model_uri`` in messages) whose files match its recorded digest
    (:func:`check_digest`), or RegistryError and no copy left. The caller removes the copy."""
    local = download(f"models:/{version.name}/{version.version}")
    try:
        check_digest(model_uri, version, stored_digest(local), unsigned_ok)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return local


def check_digest(model_uri: str, version: ModelVersion, found: str, unsigned_ok: bool) -> None:
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


def download(model_uri: str) -> Path:
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


def load_pyfunc(local: Path):
    """The pyfunc model in the folder ``local``, with ``sys.path`` as it was: MLflow puts the folder's ``code/`` first
    on it, and a folder about to be removed (in the shared temporary folder) must not stay where imports look."""
    path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(str(local))
    finally:
        sys.path[:] = path


def code_digest(dirs: tuple[Path, ...] = PACKAGE_DIRS) -> str:
    """The sha256 of the ``.py`` files of the packages in ``dirs``, with their paths from the packages' parent."""
    digest = hashlib.sha256()
    for root in dirs:
        for file in sorted(root.rglob("*.py")):
            digest.update(file.relative_to(root.parent).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def code_tags(stored: Path) -> dict[str, str]:
    """The identity of the code a downloaded version (``stored``) holds: the package version and the
    :func:`code_digest` of its stored packages (MLflow keeps each in ``code/<package>``)."""
    return {CODE_VERSION_TAG: _package_version(),
            CODE_DIGEST_TAG: code_digest(tuple(stored / "code" / path.name for path in PACKAGE_DIRS))}


@functools.cache
def _running_digest() -> str:
    return code_digest()  # read once: the code this process runs is what it imported at its start


def _package_version() -> str:
    try:
        return package_version(PACKAGE)
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def check_code(version: ModelVersion, mode: str = "warn") -> None:
    """Compare the code ``version`` stores with the code this process runs (which is what answers here): a one-line
    warning when they differ, or RegistryError with ``mode`` ``refuse``. A version registered before code digests
    were recorded says nothing, and is taken as it is."""
    recorded = version.tags.get(CODE_DIGEST_TAG)
    if not recorded or recorded == _running_digest():
        return
    what = (f"version {version.version} of '{version.name}' was registered with other code (package "
            f"{version.tags.get(CODE_VERSION_TAG, '?')}, code sha256 {recorded[:12]}...) than this process runs "
            f"({_package_version()}, {_running_digest()[:12]}...)")
    if mode == "refuse":
        raise RegistryError(f"{what}; not served (serving.code_mismatch: refuse). Serve it with the code it was "
                            "registered with, or with `mlflow models serve`, which runs its stored copy")
    log.warning("%s: this code answers for it (serving.code_mismatch: warn)", what)
