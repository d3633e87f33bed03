"""Erasure: a class (or images, by sha256) removed from every place this pipeline keeps copies, with an audit record.

Places, in the order they are cleaned: the training and test data (files deleted, then ``dvc add`` where DVC tracks
them; the DVC cache and remote objects only those images used, and the ``.dir`` listings that name them, deleted:
past data versions holding them can no longer be checked out); the registry (the champion gets a new version without
them, made champion through :mod:`pipelines.gallery_ops`; every version holding them is marked ``loadable=false`` with
``erased=<audit run>`` and its files that hold them deleted, so it is refused by the digest check before it loads);
the tracking store's artifacts (every file that names the class or holds one of the digests, and the images of a run
that had one); the inference log (Parquet files rewritten without the records, the class struck from other records'
top-k); the review queue (items and labelled folders); the flows' stage cache and run workspaces (whole entries).

A file "holds" the class when a path segment is its name, its text names it as a whole word (UTF-8, or UTF-32 as NumPy
stores strings), or its sha256 is one of the digests. The audit record (time, user, reason, class, the digests
removed, what was removed where; never an image) is a run of the ``<experiment>-erasure`` experiment with
``erasure.json``: the one place that still names them.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from siamese_core.data import IMAGE_SUFFIXES
from siamese_core.gallery import Gallery
from siamese_core.io import atomic_path

from . import gallery_ops, registry
from .files import content_hash
from .gate import CHAMPION
from .inference_log import filesystem
from .params import PipelineParams
from .tracking import client, ensure_experiment

SCAN_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """What to erase: a class name (or None) and image digests."""

    name: str | None
    digests: frozenset[str]

    def _patterns(self) -> list[re.Pattern]:
        if self.name is None:
            return []
        word = re.escape(self.name.encode())
        return [re.compile(rb"(?<![\w])" + word + rb"(?![\w])"), re.compile(re.escape(self.name.encode("utf-32-le")))]

    def holds(self, path: Path, root: Path) -> bool:
        """Whether a file holds the class or one of the images (see the module's docstring)."""
        if self.name is not None and self.name in path.relative_to(root).parts:
            return True
        try:
            if path.stat().st_size > SCAN_MAX_BYTES:
                return False
            data = path.read_bytes()
        except OSError:
            return False
        return hashlib.sha256(data).hexdigest() in self.digests or any(p.search(data) for p in self._patterns())


def _files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from (path for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink())


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


def _local(uri: str) -> Path | None:
    """The local folder of a ``file:`` artifact URI (or a plain path); None for a remote store."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def find(params: PipelineParams, target: Target, repo: Path = Path(".")) -> dict[str, list[str]]:
    """Every place and object an erasure of ``target`` touches, by place (nothing is changed)."""
    places: dict[str, list[str]] = {}
    data = [p for folder in (params.data.train_dir, params.data.test_dir)
            for p in _files(Path(folder)) if target.holds(p, Path(folder))]
    places["training data"] = [str(p) for p in data]
    md5s = {content_hash(path) for path in data}
    places["dvc cache"] = [str(p) for p in _dvc_cache_files(_dvc_cache(repo), md5s, target)]
    remote = _dvc_remote(repo)
    places["dvc remote"] = [str(p) for p in _dvc_cache_files(remote, md5s, target)] if remote else []
    held = []
    for version in _versions(params):
        gallery = _gallery_of(version)
        if gallery is not None and (target.name in gallery.class_names
                                    or target.digests & set(gallery.entry_digests())):
            held.append(f"{version.name}/{version.version}")
    places["registered versions"] = held
    places["tracking artifacts"] = [str(p) for p in _artifact_files(params, target)]
    places["inference log"] = [str(p) for p in _log_files(params, target)]
    review = Path(params.monitoring.review_dir)
    places["review queue"] = [str(p) for p in _files(review) if _review_item_holds(p, review, target)]
    places["stage cache"] = [str(p) for p in _entries(repo / ".siamese-cache" / "stages", 2, target)]
    places["run workspaces"] = [str(p) for p in _entries(repo / "runs", 1, target)]
    return places


def _dvc_cache(repo: Path) -> Path:
    return repo / ".dvc" / "cache" / "files" / "md5"


def _dvc_remote(repo: Path) -> Path | None:
    """The default DVC remote's object folder, when it is a local folder (DVC's config, read by DVC)."""
    if not (repo / ".dvc").is_dir():
        return None
    from dvc.repo import Repo  # DVC takes a second to import: only where a repository is

    with Repo(str(repo)) as dvc_repo:
        config = dvc_repo.config
        name = config["core"].get("remote")
        url = config["remote"][name]["url"] if name else None
    folder = _local(url) if url else None
    return None if folder is None else (repo / folder / "files" / "md5")


def _dvc_cache_files(root: Path | None, md5s: set[str], target: Target) -> list[Path]:
    """The objects of ``md5s`` under a DVC cache or remote, and the ``.dir`` listings naming the target."""
    if root is None or not root.is_dir():
        return []
    found = []
    for path in _files(root):
        md5 = path.parent.name + path.name
        if md5 in md5s or (path.suffix == ".dir" and target.holds(path, root)):
            found.append(path)
    return found


def _artifact_root(params: PipelineParams) -> Path | None:
    experiment = client().get_experiment_by_name(params.register.experiment)
    return None if experiment is None else _local(experiment.artifact_location)


def _artifact_files(params: PipelineParams, target: Target) -> list[Path]:
    """Artifact files that hold the target, and every image of a run (or model) folder that has one."""
    root = _artifact_root(params)
    if root is None:
        return []
    found = [path for path in _files(root) if target.holds(path, root)]
    owners = {path.relative_to(root).parts[:2] for path in found}
    images = [path for path in _files(root) if path.suffix.lower() in IMAGE_SUFFIXES
              and path.relative_to(root).parts[:2] in owners and path not in found]
    return found + images


def _log_files(params: PipelineParams, target: Target) -> list[str]:
    uri = params.monitoring.log_location()
    if not uri:
        return []
    fs, root = filesystem(uri)
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


def _review_item_holds(path: Path, root: Path, target: Target) -> bool:
    if target.holds(path, root):
        return True
    sidecar = path.with_suffix(".json")
    return sidecar != path and sidecar.is_file() and target.holds(sidecar, root)


def _entries(root: Path, depth: int, target: Target) -> list[Path]:
    """Entries ``depth`` folders below ``root`` (a cache key, a run workspace) holding a file of the target."""
    if not root.is_dir():
        return []
    entries = root.glob("/".join(["*"] * depth))
    return [entry for entry in sorted(entries) if entry.is_dir()
            and any(target.holds(path, entry) for path in _files(entry))]


def erase(params: PipelineParams, target: Target, reason: str, dry_run: bool = False,
          repo: Path = Path(".")) -> dict:
    """Erase ``target`` everywhere (:func:`find`'s places); with ``dry_run`` only list them. Returns the places and,
    once done, the audit run's id."""
    places = find(params, target, repo)
    if dry_run:
        return {"dry_run": True, "places": places}
    audit = _audit_run(params, target, reason)
    champion = registry.alias_version(params.register.model_name, CHAMPION)
    new_version = None
    if champion is not None and f"{champion.name}/{champion.version}" in places["registered versions"]:
        edit = gallery_ops.Edit(f"erasure (audit run {audit})", (target.name,) if target.name else (),
                                tuple(sorted(target.digests)), public=f"erasure recorded in audit run {audit}")
        new_version = gallery_ops.edit_registered(champion.name, str(champion.version), _holding(edit, champion),
                                                  params.register)["version"]
    for held in places["registered versions"]:
        name, _, version = held.partition("/")
        client().set_model_version_tag(name, version, "loadable", "false")
        client().set_model_version_tag(name, version, "erased", audit)
        client().update_model_version(name, version, description=f"Erased (audit run {audit}): its files that held "
                                      "erased images were deleted; it can no longer be loaded.")
    for path in map(Path, places["training data"]):
        path.unlink()
    _dvc_add(params, repo)
    for path in map(Path, places["dvc cache"] + places["dvc remote"] + places["tracking artifacts"]
                    + places["review queue"]):
        path.unlink(missing_ok=True)
    _rewrite_log(params, target, places["inference log"])
    for entry in map(Path, places["stage cache"] + places["run workspaces"]):
        shutil.rmtree(entry, ignore_errors=True)
    client().log_dict(audit, {"places": {k: len(v) for k, v in places.items()}, "new_version": new_version},
                      "places.json")
    client().set_terminated(audit)
    return {"dry_run": False, "places": places, "audit_run": audit, "new_version": new_version}


def _holding(edit: gallery_ops.Edit, version) -> gallery_ops.Edit:
    """The edit limited to what the version's gallery holds (an erasure names digests it may not hold)."""
    gallery = _gallery_of(version)
    held = set(gallery.entry_digests()) if gallery is not None else set()
    classes = tuple(c for c in edit.classes if gallery is not None and c in gallery.class_names)
    return gallery_ops.Edit(edit.reason, classes, tuple(d for d in edit.entries if d in held), public=edit.public)


def _dvc_add(params: PipelineParams, repo: Path) -> None:
    """``dvc add`` again each DVC-tracked folder that holds the data, so the data version follows the erasure."""
    for tracked in sorted(repo.glob("*.dvc")) + sorted(repo.glob("data/*.dvc")):
        folder = tracked.with_suffix("")
        if any(Path(d).resolve().is_relative_to(folder.resolve()) for d in (params.data.train_dir, params.data.test_dir)):
            subprocess.run(["dvc", "add", str(folder.relative_to(repo))], cwd=repo, check=True, capture_output=True)


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


def counts(places: dict[str, list[str]]) -> dict[str, int]:
    """Objects per place."""
    return {place: len(found) for place, found in places.items()}

