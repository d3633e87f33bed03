"""Erasure: a class (or images, by sha256) removed from every place this pipeline keeps copies, with an audit record.

Places, in the order they are cleaned: the registry (the champion gets a new version without them, made champion
through :mod:`pipelines.gallery_ops`; every version holding them is marked ``loadable=false`` with ``erased=<audit
run>`` and its files that hold them deleted, so it is refused by the digest check before it loads); the training and
test data (files deleted, then ``dvc add`` and, with a default remote, ``dvc push`` of that data); the pipeline's
outputs in the project (``dvc repro`` makes them again); DVC's cache and default remote (a local folder or S3, through
DVC's own filesystem: the objects of the images, every object and ``.dir`` listing that holds the target: past data
versions holding them can no longer be checked out) and DVC's state caches; the tracking store's artifacts, in every
experiment (every file that names the class or holds one of the digests, and the images of a run or model that had
one); the inference log (Parquet files rewritten without the records, the class struck from other records' top-k);
the review queue (items and labelled folders); Label Studio's tasks that show or name them, and the class among its
project's choices; the flows' stage cache and run workspaces (whole entries); last, the tracking database's rows
that MLflow offers no call to change (:data:`TRACKING_ROWS`), rewritten in SQL.

A file "holds" the target when a path segment is the class name, its text names it as a whole word (UTF-8, as JSON
escapes it, or UTF-32 as NumPy stores strings), its sha256 is one of the digests, or it holds one of the digests as
text. The audit record (time, user, reason, class, the digests removed, then every object removed or rewritten,
place by place; never an image) is a run of the ``<experiment>-erasure`` experiment: the one place that still names
them.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from mlflow.entities import ViewType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from siamese_core.data import IMAGE_SUFFIXES
from siamese_core.errors import ConfigError
from siamese_core.gallery import Gallery
from siamese_core.io import atomic_path

from . import gallery_ops, registry
from .errors import RegistryError
from .files import content_hash
from .gate import CHALLENGER, CHAMPION
from .inference_log import filesystem
from .labelstudio import PROJECT_TITLE, LabelStudio, task_image_digest
from .params import PipelineParams
from .pipeline import STAGES
from .rollout import live_plan
from .tracking import client, ending, ensure_experiment, tracking_uri

SCAN_MAX_BYTES = 256 * 1024 * 1024
BACKEND_VARIABLE = "MLFLOW_BACKEND_STORE_URI"  # the tracking server's database, as `mlflow server` reads it
# The tracking database's columns that can hold a class name, and what erasure does to a row naming one: "rewrite"
# the value (JSON without the keys naming it, its strings and plain text with the name replaced by "[erased]"), or
# "delete" the row (the name is its key). MLflow has no call to change a dataset row or delete a metric.
TRACKING_ROWS = {("datasets", "dataset_profile"): "rewrite", ("datasets", "dataset_source"): "rewrite",
                 ("metrics", "key"): "delete", ("latest_metrics", "key"): "delete",
                 ("logged_model_metrics", "metric_name"): "delete", ("tags", "value"): "rewrite",
                 ("model_versions", "description"): "rewrite", ("model_version_tags", "value"): "rewrite"}
ERASED = "[erased]"
_HEX = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
_WIDE_HEX = re.compile(rb"(?:[0-9a-f]\x00\x00\x00){64}")


@dataclass(frozen=True)
class Target:
    """What to erase: a class name (or None) and image digests."""

    name: str | None
    digests: frozenset[str]

    def texts(self) -> list[str]:
        """The class name as text holds it: itself, and as JSON escapes it (``\\uXXXX`` beyond ASCII)."""
        return [] if self.name is None else list(dict.fromkeys([self.name, json.dumps(self.name)[1:-1]]))

    @cached_property
    def _patterns(self) -> list[re.Pattern[bytes]]:
        words = [re.compile(rb"(?<![\w])" + re.escape(text.encode()) + rb"(?![\w])") for text in self.texts()]
        return words + ([re.compile(re.escape(self.name.encode("utf-32-le")))] if self.name else [])

    @cached_property
    def words(self) -> re.Pattern[str]:
        """The class name (:meth:`texts`) or a digest, as a whole word."""
        either = "|".join(re.escape(text) for text in [*self.texts(), *sorted(self.digests)]) or r"(?!)"
        return re.compile(rf"(?<!\w)(?:{either})(?!\w)")

    def names(self, text: str) -> bool:
        """Whether ``text`` names the class as a whole word or holds one of the digests."""
        return bool(self.words.search(text))

    def holds_bytes(self, data: bytes) -> bool:
        """Whether ``data`` is one of the images, holds a digest as text, or names the class."""
        if hashlib.sha256(data).hexdigest() in self.digests:
            return True
        if self.digests and ({m.decode() for m in _HEX.findall(data)} & self.digests
                             or {m.decode("utf-32-le") for m in _WIDE_HEX.findall(data)} & self.digests):
            return True
        return any(p.search(data) for p in self._patterns)

    def in_path(self, relative: str | os.PathLike) -> bool:
        """Whether a folder or file of ``relative`` is named after the class."""
        return self.name is not None and self.name in PurePosixPath(relative).parts

    def holds(self, path: Path, root: Path) -> bool:
        """Whether a file holds the class or one of the images (see the module's docstring)."""
        if self.in_path(path.relative_to(root)):
            return True
        try:
            if path.stat().st_size > SCAN_MAX_BYTES:
                return False
            return self.holds_bytes(path.read_bytes())
        except OSError:
            return False


def _files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from (path for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink())
    elif root.is_file():
        yield root


def class_digests(params: PipelineParams, name: str) -> set[str]:
    """The sha256 of every image of class ``name`` in the training and test data and in the registered galleries."""
    found = {hashlib.sha256(path.read_bytes()).hexdigest()
             for folder in (params.data.train_dir, params.data.test_dir) for path in _files(Path(folder) / name)}
    for version in _versions(params):
        gallery = _gallery_of(version)
        if gallery is not None and name in gallery.class_names:
            label = gallery.class_names.index(name)
            found |= {d for d, c in zip(gallery.entry_digests(), gallery.labels) if c == label and d}
    return found


def _versions(params: PipelineParams) -> list:
    name = params.register.model_name
    return [v for v in client().search_model_versions(f"name = '{name}'") if (v.tags or {}).get("loadable") != "false"]


def _gallery_of(version) -> Gallery | None:
    try:
        return gallery_ops.read_gallery(f"models:/{version.name}/{version.version}")
    except Exception:  # a version whose files are gone or damaged holds nothing this can read
        return None


@dataclass
class Plan:
    """What an erasure touches, by place (``places``: the objects, as the audit record lists them), and how each
    place is cleaned (``clean``: run in order, after the registry's versions)."""

    places: dict[str, list[str]]
    clean: dict[str, Callable[[], None]]


def plan(params: PipelineParams, target: Target, repo: Path = Path("."), studio: LabelStudio | None = None) -> Plan:
    """Every place and object an erasure of ``target`` touches (nothing is changed yet)."""
    database = _tracking_database()
    places: dict[str, list[str]] = {}
    clean: dict[str, Callable[[], None]] = {}

    def place(name: str, objects: list, action: Callable[[], None], shown: Callable[[Any], str] = str) -> None:
        places[name], clean[name] = [shown(item) for item in objects], action

    data = [p for folder in (params.data.train_dir, params.data.test_dir)
            for p in _files(Path(folder)) if target.holds(p, Path(folder))]
    local, _ = filesystem(str(repo))
    outputs = sorted({p for stage in STAGES.values() for out in stage.writes for p in _files(repo / out)
                      if target.holds(p, repo)})
    with _dvc(repo) as dvc:
        pushed = "dvc remote" in dvc
        place("training data", data, lambda: _data_erased(params, data, repo, pushed))
        place("pipeline outputs", outputs, lambda: _files_deleted(local, [str(p) for p in outputs]))
        cache: Any = dvc.get("dvc cache")
        remote: Any = dvc.get("dvc remote")
        md5s = {content_hash(path) for path in data}
        in_cache = _dvc_objects(cache, target, md5s, set())
        md5s |= in_cache
        cached = _dvc_paths(cache, in_cache)
        place("dvc cache", cached, lambda: _dvc_removed(cache, cached), lambda path: cache.fs.unstrip_protocol(path))
        stored = _dvc_paths(remote, _dvc_objects(remote, target, md5s, _oids(cache)))
        place("dvc remote", stored, lambda: _dvc_removed(remote, stored), lambda path: remote.fs.unstrip_protocol(path))
        state = [p for folder in dvc.get("state", []) for p in _files(folder) if target.holds(p, folder)]
        place("dvc state", state, lambda: _files_deleted(local, [str(p) for p in state]))
    place("registered versions", _held_versions(params, target), lambda: None)
    artifacts = _artifacts(params, target)
    place("tracking artifacts", artifacts, lambda: _artifacts_deleted(artifacts),
          lambda found: f"{found[0].artifact_uri}/{found[1]}")
    logs = _log_files(params, target)
    place("inference log", logs, lambda: _rewrite_log(params, target, logs))
    tasks = _studio_tasks(studio, target)
    shown = {task["data"]["sha256"] for task in tasks if isinstance(task.get("data", {}).get("sha256"), str)}
    fs, review = filesystem(params.monitoring.review_dir)
    items = _review_items(fs, review, Target(target.name, target.digests | shown))
    place("review queue", items, lambda: _files_deleted(fs, items))
    place("label studio tasks", tasks, lambda: _studio_erased(studio, [task["id"] for task in tasks], target),
          lambda task: f"{studio.url if studio else ''}/api/tasks/{task['id']}")
    entries = _entries(repo / ".siamese-cache" / "stages", 2, target) + _entries(repo / "runs", 1, target)
    place("stage cache and run workspaces", entries, lambda: _trees_deleted(entries))
    rows = _tracking_rows(database, target)
    place("tracking database", rows, lambda: _rows_erased(database, target, rows), lambda row: row[0])
    return Plan(places, clean)


def _trees_deleted(entries: list[Path]) -> None:
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)


def _tracking_database() -> str | None:
    """The tracking store's database: the tracking URI itself, or a server's ``$MLFLOW_BACKEND_STORE_URI``; None
    for a file store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        if os.environ.get(BACKEND_VARIABLE):
            return os.environ[BACKEND_VARIABLE]
        raise ConfigError(f"erasure rewrites rows of the tracking server's database that MLflow has no call for: set "
                          f"${BACKEND_VARIABLE} to its database URI (the one `mlflow server` runs with)")
    return uri if "://" in uri and not uri.startswith("file:") else None


@contextmanager
def _dvc(repo: Path) -> Iterator[dict[str, Any]]:
    """DVC's local cache and default remote (object databases, through DVC's own filesystems) and the folders of its
    state caches; empty outside a DVC repository."""
    if not (repo / ".dvc").is_dir():
        yield {}
        return
    from dvc.repo import Repo  # DVC takes a second to import: only where a repository is

    with Repo(str(repo)) as dvc_repo:
        found: dict[str, Any] = {"dvc cache": dvc_repo.cache.local,
                                 "state": [Path(dvc_repo.site_cache_dir), Path(dvc_repo.tmp_dir)]}
        if dvc_repo.config["core"].get("remote"):
            found["dvc remote"] = dvc_repo.cloud.get_remote_odb()
        yield found


def _oids(odb) -> set[str]:
    return set(odb.all()) if odb is not None else set()


def _dvc_objects(odb, target: Target, md5s: set[str], known: set[str]) -> set[str]:
    """The objects of ``odb`` to delete: the images (``md5s``, and each entry under the class's folder in a ``.dir``
    listing, read first), and each object that holds the target. Objects in ``known`` (the local cache, scanned
    already) are not read again."""
    if odb is None:
        return set()
    oids = _oids(odb)
    listings = {oid: json.loads(odb.fs.cat_file(odb.oid_to_path(oid))) for oid in oids if oid.endswith(".dir")}
    md5s = md5s | {e["md5"] for entries in listings.values() for e in entries if target.in_path(e["relpath"])}
    held = {oid for oid, entries in listings.items()
            if any(e["md5"] in md5s for e in entries) or target.holds_bytes(json.dumps(entries).encode())}
    for oid in sorted(oids - md5s - known - set(listings)):
        path = odb.oid_to_path(oid)
        if odb.fs.size(path) <= SCAN_MAX_BYTES and target.holds_bytes(odb.fs.cat_file(path)):
            held.add(oid)
    return (oids & md5s) | held


def _dvc_paths(odb, oids: set[str]) -> list[str]:
    return [odb.oid_to_path(oid) for oid in sorted(oids)]


def _dvc_removed(odb, paths: list[str]) -> None:
    if odb is not None and paths:
        odb.fs.remove(paths)


def _held_versions(params: PipelineParams, target: Target) -> list[str]:
    held = []
    for version in _versions(params):
        gallery = _gallery_of(version)
        if gallery is not None and (target.name in gallery.class_names
                                    or target.digests & set(gallery.entry_digests())):
            held.append(f"{version.name}/{version.version}")
    return held


def _artifacts(params: PipelineParams, target: Target) -> list[tuple[Any, str]]:
    """(repository, path) of each artifact file, in every experiment but the audit one, that holds the target, and of
    every image of a run (or model) that has one. Read through MLflow's artifact repositories: local, S3 or a server."""
    audit = f"{params.register.experiment}-erasure"
    found: list[tuple[Any, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for experiment in client().search_experiments(view_type=ViewType.ALL):
            if experiment.name == audit:
                continue
            repository = get_artifact_repository(experiment.artifact_location)
            files = list(_artifact_paths(repository, None))
            held = [path for path in files if target.in_path(path) or _artifact_holds(repository, path, target, scratch)]
            owners = {PurePosixPath(path).parts[:2] for path in held}
            images = [path for path in files if PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES
                      and PurePosixPath(path).parts[:2] in owners and path not in held]
            found += [(repository, path) for path in held + images]
    return found


def _artifact_paths(repository, path: str | None) -> Iterator[str]:
    for info in repository.list_artifacts(path):
        if info.is_dir:
            yield from _artifact_paths(repository, info.path)
        elif (info.file_size or 0) <= SCAN_MAX_BYTES:
            yield info.path


def _artifacts_deleted(artifacts: list[tuple[Any, str]]) -> None:
    for repository, path in artifacts:
        repository.delete_artifacts(path)


def _artifact_holds(repository, path: str, target: Target, scratch: str) -> bool:
    local = Path(repository.download_artifacts(path, scratch))
    try:
        return target.holds_bytes(local.read_bytes())
    finally:
        local.unlink(missing_ok=True)


def _log_files(params: PipelineParams, target: Target) -> list[str]:
    uri = params.monitoring.log_location()
    if not uri:
        return []
    fs, root = filesystem(uri)
    if not fs.exists(root):
        return []
    found = []
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet") and "/." not in p):
        with fs.open(path, "rb") as file:
            table = pq.read_table(file)
        if _log_keep(table, target)[1]:
            found.append(path)
    return found


def _log_keep(table: pa.Table, target: Target) -> tuple[pa.Table, bool]:
    """The log table without the target's records, the class struck from other records' top-k; and whether it
    changed."""
    records = table.to_pylist()
    kept = [r for r in records if r["sha256"] not in target.digests and r["label"] != target.name]
    for record in kept:
        if target.name in (record["top_k_labels"] or []):
            pairs = [(label, d) for label, d in zip(record["top_k_labels"], record["top_k_distances"])
                     if label != target.name]
            record["top_k_labels"], record["top_k_distances"] = [p[0] for p in pairs], [p[1] for p in pairs]
    changed = len(kept) != len(records) or any(
        target.name in (r["top_k_labels"] or []) for r in records) if records else False
    return pa.Table.from_pylist(kept, schema=table.schema), changed


def _review_items(fs, root: str, target: Target) -> list[str]:
    """The review queue's files (images and their ``.json``) that hold the target, or whose sidecar does."""
    if not fs.exists(root):
        return []
    files = sorted(fs.find(root))
    held = {path for path in files if target.in_path(PurePosixPath(path).relative_to(root))
            or (fs.size(path) <= SCAN_MAX_BYTES and target.holds_bytes(fs.cat_file(path)))}
    sidecars = {str(PurePosixPath(path).with_suffix("")) for path in held if path.endswith(".json")}
    return [path for path in files if path in held or str(PurePosixPath(path).with_suffix("")) in sidecars]


def _files_deleted(fs, items: list[str]) -> None:
    """Delete the files, then each folder they leave empty (a class's folder is named after it)."""
    for item in items:
        if fs.exists(item):
            fs.rm_file(item)
    for folder in sorted({posixpath.dirname(item) for item in items}, key=len, reverse=True):
        if fs.isdir(folder) and not fs.ls(folder):
            fs.rmdir(folder)


def _studio_tasks(studio: LabelStudio | None, target: Target) -> list[dict]:
    """The Label Studio review project's tasks that show one of the images, or name the class or a digest (in their
    data, the model's pre-annotation, or a person's label or draft). The review queue's items these tasks show go
    too: a person may have named the class only here."""
    project = studio.find_project(PROJECT_TITLE) if studio else None
    if studio is None or project is None:
        return []
    return [task for task in studio.tasks(project) if task_image_digest(task) in target.digests or target.names(
        json.dumps({key: task.get(key) for key in ("data", "predictions", "annotations", "drafts")}, ensure_ascii=False))]


def _studio_erased(studio: LabelStudio | None, tasks: list[int], target: Target) -> None:
    """Delete the tasks, then the class from the project's choices."""
    project = studio.find_project(PROJECT_TITLE) if studio else None
    if studio is None or project is None:
        return
    studio.delete_tasks(tasks)
    if target.name is not None:
        studio.drop_choice(project, target.name)


def _entries(root: Path, depth: int, target: Target) -> list[Path]:
    """Entries ``depth`` folders below ``root`` (a cache key, a run workspace) holding a file of the target."""
    if not root.is_dir():
        return []
    entries = root.glob("/".join(["*"] * depth))
    return [entry for entry in sorted(entries) if entry.is_dir()
            and any(target.holds(path, entry) for path in _files(entry))]


@contextmanager
def _reflected(database: str, names: set[str]) -> Iterator[tuple[sa.Engine, dict[str, sa.Table]]]:
    """An engine on the tracking database and its tables among ``names`` (those it has)."""
    engine = sa.create_engine(database)
    try:
        tables = sa.MetaData()
        tables.reflect(engine, only=lambda name, _: name in names)
        yield engine, dict(tables.tables)
    finally:
        engine.dispose()


def _tracking_rows(database: str | None, target: Target) -> list[tuple[str, dict]]:
    """The rows of :data:`TRACKING_ROWS` that name the class or hold a digest: a line for the audit record (table,
    column, the row's key) and the row's key."""
    needles = target.texts() + sorted(target.digests)
    if database is None or not needles:
        return []
    found = []
    with _reflected(database, {table for table, _ in TRACKING_ROWS}) as (engine, tables), engine.connect() as connection:
        for (name, column), _ in TRACKING_ROWS.items():
            if name not in tables:
                continue
            table = tables[name]
            keys = list(table.primary_key.columns)
            query = sa.select(*keys, table.c[column]).where(sa.or_(*(table.c[column].contains(n, autoescape=True)
                                                                     for n in needles)))
            for row in connection.execute(query):
                if row[-1] is not None and target.names(row[-1]):
                    key = {c.name: row[i] for i, c in enumerate(keys)}
                    found.append((f"{name}.{column} {json.dumps(key, default=str, ensure_ascii=False)}",
                                  {"table": name, "column": column, "key": key}))
    return found


def _without(value: Any, target: Target) -> Any:
    """A JSON value without the keys that name the target, its strings that do replaced by ``[erased]``."""
    if isinstance(value, dict):
        return {k: _without(v, target) for k, v in value.items() if not target.names(k)}
    if isinstance(value, list):
        return [_without(v, target) for v in value]
    return ERASED if isinstance(value, str) and target.names(value) else value


def _rewritten(value: str, target: Target) -> str:
    """A value without the target: JSON (an object or list) without it (:func:`_without`), text with it replaced."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict | list):
        return json.dumps(_without(parsed, target))
    return target.words.sub(ERASED, value)


def _rows_erased(database: str | None, target: Target, rows: list[tuple[str, dict]]) -> None:
    """Rewrite or delete each row (:data:`TRACKING_ROWS`), in one transaction."""
    if database is None or not rows:
        return
    with _reflected(database, {row["table"] for _, row in rows}) as (engine, tables), engine.begin() as connection:
        for _, row in rows:
            table, column = tables[row["table"]], row["column"]
            where = sa.and_(*(table.c[k] == v for k, v in row["key"].items()))
            if TRACKING_ROWS[(row["table"], column)] == "delete":
                connection.execute(sa.delete(table).where(where))
                continue
            value = connection.execute(sa.select(table.c[column]).where(where)).scalar_one()
            connection.execute(sa.update(table).where(where).values({column: _rewritten(value, target)}))


def erase(params: PipelineParams, target: Target, reason: str, dry_run: bool = False,
          repo: Path = Path("."), studio: LabelStudio | None = None) -> dict:
    """Erase ``target`` everywhere (:func:`plan`'s places); with ``dry_run`` only list them. Returns the places and,
    once done, the audit run's id."""
    planned = plan(params, target, repo, studio)
    places = planned.places
    if dry_run:
        return {"dry_run": True, "places": places}
    live = live_plan(registry.alias_version(params.register.model_name, CHALLENGER))
    if live is not None and places["registered versions"]:
        raise RegistryError(f"version {live.version} is live as challenger in a {live.mode} rollout, which would keep "
                            "serving what the erasure removes: end it first (`siamese rollout status`, `siamese promote`)")
    audit = _audit_run(params, target, reason)
    with ending(client(), audit):  # FAILED with the error when a place cannot be erased
        champion = registry.alias_version(params.register.model_name, CHAMPION)
        new_version = None
        if champion is not None and f"{champion.name}/{champion.version}" in places["registered versions"]:
            edit = gallery_ops.Edit(f"erasure (audit run {audit})", (target.name,) if target.name else (),
                                    tuple(sorted(target.digests)), public=f"erasure recorded in audit run {audit}")
            edited = gallery_ops.edit_registered(champion.name, str(champion.version), _holding(edit, champion))
            new_version = edited["version"]
            if edited["alias"] != CHAMPION:  # the same-queries check cannot keep erased images in service
                registry.set_champion(champion.name, new_version, edit.reason, force=True)
        for held in places["registered versions"]:
            name, _, version = held.partition("/")
            client().set_model_version_tag(name, version, "loadable", "false")
            client().set_model_version_tag(name, version, "erased", audit)
            client().update_model_version(name, version, description=f"Erased (audit run {audit}): its files that held "
                                          "erased images were deleted; it can no longer be loaded.")
        for clean in planned.clean.values():
            clean()
        client().log_dict(audit, {"places": places, "new_version": new_version}, "places.json")
    return {"dry_run": False, "places": places, "audit_run": audit, "new_version": new_version}


def _holding(edit: gallery_ops.Edit, version) -> gallery_ops.Edit:
    """The edit limited to what the version's gallery holds (an erasure names digests it may not hold)."""
    gallery = _gallery_of(version)
    held = set(gallery.entry_digests()) if gallery is not None else set()
    classes = tuple(c for c in edit.classes if gallery is not None and c in gallery.class_names)
    return gallery_ops.Edit(edit.reason, classes, tuple(d for d in edit.entries if d in held), public=edit.public)


def _data_erased(params: PipelineParams, data: list[Path], repo: Path, pushed: bool) -> None:
    """Delete the data files, then ``dvc add`` again each DVC-tracked folder that holds the data (and, with a default
    remote, ``dvc push`` it there), so the data version follows the erasure."""
    _files_deleted(filesystem(str(repo))[0], [str(p) for p in data])
    folders = {Path(d).resolve() for d in (params.data.train_dir, params.data.test_dir)}
    for tracked in sorted(repo.glob("*.dvc")) + sorted(repo.glob("data/*.dvc")):
        folder = tracked.with_suffix("")
        if any(d.is_relative_to(folder.resolve()) for d in folders):
            _dvc_command(repo, "add", str(folder.relative_to(repo)))
            if pushed:
                _dvc_command(repo, "push", str(tracked.relative_to(repo)))


def _dvc_command(repo: Path, *args: str) -> None:
    done = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode:
        raise ConfigError(f"dvc {' '.join(args)} failed during the erasure: "
                          f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def _rewrite_log(params: PipelineParams, target: Target, files: list[str]) -> None:
    uri = params.monitoring.log_location()
    if not uri or not files:
        return
    fs, _ = filesystem(uri)
    for path in files:
        with fs.open(path, "rb") as file:
            table, _ = _log_keep(pq.read_table(file), target)
        if fs.protocol in ("file", ("file", "local")):
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
            os.chmod(path, 0o600)
        else:
            with fs.open(path, "wb") as file:
                pq.write_table(table, file)


def _audit_run(params: PipelineParams, target: Target, reason: str) -> str:
    """Open the audit run: who, when, why, which class and digests; never an image."""
    experiment = ensure_experiment(f"{params.register.experiment}-erasure")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    run = client().create_run(experiment, run_name=f"erasure-{datetime.now(UTC):%Y%m%d-%H%M%S}",
                              tags={"erasure.by": getpass.getuser(), "erasure.reason": reason, "erasure.at": now})
    client().log_dict(run.info.run_id, {"time": now, "user": getpass.getuser(), "reason": reason,
                                        "class": target.name, "digests": sorted(target.digests)}, "erasure.json")
    return run.info.run_id
