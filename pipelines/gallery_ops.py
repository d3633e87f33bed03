"""What a gallery knows, listed and corrected: its classes and entries (each with a stable id from its source image's
sha256), a class or entries removed, a class renamed; on a bundle folder (rewritten atomically) or on a registered
version (a new version, whose card says what changed, why and from which version).

A registered edit reaches ``champion`` through the gate's checks for a gallery edit (:func:`edit_decision`, pure):
its source must be the champion; where no class was removed, the two versions answer the same queries (each gallery
image both keep, against the others: the network is the same, so only the gallery can change an answer) and the edit
must not answer worse; where classes were removed that comparison is skipped, and the card says so. The move itself is
the registry's (:func:`pipelines.registry.place_enrolled`: a live rollout refuses it, shadow and canary make it the
challenger). Neither path imports TensorFlow until the registry checks the new version serves.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from siamese_core.distance import squared_distances
from siamese_core.errors import BundleError, DatasetError
from siamese_core.gallery import Gallery
from siamese_core.io import atomic_dir

from . import registry
from .errors import RegistryError
from .feedback import name_problem
from .gate import CHAMPION
from .params import RegisterConfig
from .tracking import PipelineRun, client, ensure_experiment, tracked_run

# The bundle's file names (siamese_core.recognizer's, which imports Keras to read the rest of the bundle).
GALLERY_FILE, METADATA_FILE = "gallery.npz", "metadata.json"
SAME_QUERIES_MAX = 1000  # gallery images compared as queries, a seeded sample beyond this


@dataclass(frozen=True)
class Edit:
    """A change to a gallery: classes removed, entries (by id or source sha256) removed, or ``renames`` {old: new}.
    ``reason`` says why; ``public`` (when set) is what the card and tags say instead of the classes and ids, for an
    erasure whose record must not name them."""

    reason: str
    classes: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()
    renames: dict[str, str] = field(default_factory=dict)
    public: str | None = None

    def described(self) -> str:
        """The change in words (``public`` when set)."""
        if self.public is not None:
            return self.public
        parts = [f"class {', '.join(self.classes)} removed"] if self.classes else []
        parts += [f"{len(self.entries)} entries removed ({', '.join(self.entries[:10])})"] if self.entries else []
        parts += [f"class {old} renamed {new}" for old, new in self.renames.items()]
        return "; ".join(parts)


def entry_id(digest: str, path: str) -> str:
    """A gallery entry's stable id: the first 16 hex digits of its source image's sha256 (of its path where the
    image's digest is unknown, prefixed ``p``)."""
    return digest[:16] if digest else "p" + hashlib.sha256(path.encode()).hexdigest()[:15]


def entries(gallery: Gallery) -> list[dict]:
    """Each gallery row: its id, class, source sha256 ("" if unknown) and path."""
    return [{"id": entry_id(digest, path), "class": gallery.class_names[label], "sha256": digest, "path": path}
            for label, digest, path in zip(gallery.labels, gallery.entry_digests(), gallery.paths)]


def class_counts(gallery: Gallery) -> dict[str, int]:
    """Images per class, in the gallery's class order."""
    counts = np.bincount(gallery.labels, minlength=len(gallery.class_names))
    return {name: int(count) for name, count in zip(gallery.class_names, counts)}


def planned(gallery: Gallery, edit: Edit) -> tuple[np.ndarray, list[str]]:
    """The rows an edit keeps (a mask) and each row's class name after it; DatasetError, with nothing changed, for a
    class or entry the gallery does not hold, a new name that is not a fit class name, or an edit that empties it."""
    missing = [name for name in [*edit.classes, *edit.renames] if name not in gallery.class_names]
    if missing:
        raise DatasetError(f"the gallery holds no class {', '.join(missing)}; `siamese gallery list` shows its classes")
    for new in edit.renames.values():
        if (problem := name_problem(new)) is not None or new == "unknown":
            raise DatasetError(f"--to {new!r}: not a fit class name ({problem or 'the label of images of no known class'})")
    rows = entries(gallery)
    wanted = set(edit.entries)
    found = {key for row in rows for key in (row["id"], row["sha256"]) if key in wanted}
    if wanted - found:
        raise DatasetError(f"the gallery holds no entry {', '.join(sorted(wanted - found))}; "
                           "`siamese gallery list --images` shows each entry's id")
    keep = np.array([row["class"] not in edit.classes and not ({row["id"], row["sha256"]} & wanted) for row in rows])
    if not keep.any():
        raise DatasetError("the edit would leave the gallery empty; a recogniser needs at least one class")
    return keep, [edit.renames.get(row["class"], row["class"]) for row in rows]


def edited(gallery: Gallery, edit: Edit) -> Gallery:
    """The gallery after ``edit`` (see :func:`planned`)."""
    keep, _ = planned(gallery, edit)
    result = gallery.kept(keep)
    for old, new in edit.renames.items():
        result = result.relabelled(old, new)
    return result


def same_queries(gallery: Gallery, keep: np.ndarray, names_after: list[str]) -> tuple[float, float, int]:
    """Top-1 of the gallery before and after an edit on the same queries: each image both keep, searched among the
    other images of each (nearest image, named after the edit). Returns ``(before, after, queries)``."""
    rows = np.flatnonzero(keep)
    if len(rows) > SAME_QUERIES_MAX:
        rows = np.sort(np.random.default_rng(0).choice(rows, SAME_QUERIES_MAX, replace=False))
    names = np.array(names_after, dtype=object)
    right = np.zeros((2, len(rows)))
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        distances = squared_distances(np.asarray(gallery.embeddings[chunk]), np.asarray(gallery.embeddings))
        distances[np.arange(len(chunk)), chunk] = np.inf  # not itself
        right[0, start : start + len(chunk)] = names[distances.argmin(axis=1)] == names[chunk]
        distances[:, ~keep] = np.inf  # the images the edit removed
        right[1, start : start + len(chunk)] = names[distances.argmin(axis=1)] == names[chunk]
    before, after = right.mean(axis=1) if len(rows) else (0.0, 0.0)
    return float(before), float(after), len(rows)


def edit_decision(source: str, champion: str | None, classes_removed: bool,
                  figures: tuple[float, float, int] | None) -> tuple[bool, str]:
    """The gate's checks for a gallery edit of version ``source``: whether the new version becomes champion, and why.
    ``figures``: :func:`same_queries` (None where classes were removed, so the comparison is skipped)."""
    if champion is None or str(source) != str(champion):
        return False, (f"edited from version {source}, which is not the champion ({champion or 'none'}): the champion "
                       "stays; `siamese promote` makes this version champion by hand")
    if classes_removed or figures is None:
        return True, ("classes were removed, so the same-queries comparison with the champion is skipped (its queries "
                      "of those classes have no right answer here); same network, its files checked")
    before, after, count = figures
    verdict = f"top-1 {after:.4f} against the champion's {before:.4f} on the same {count} gallery images as queries"
    if after < before:
        return False, f"{verdict}: worse, so the champion stays; `siamese promote` makes this version champion by hand"
    return True, f"{verdict}: not worse; same network, its files checked"


def write_bundle(source: Path, target: Path, gallery: Gallery, note: dict) -> Path:
    """Write a bundle like ``source`` with ``gallery`` at ``target``, atomically, ``note`` appended to its metadata's
    ``gallery_edits``; a gallery searched through an on-disk index gets one built again."""
    ondisk = {Gallery.ondisk_files(GALLERY_FILE)[0].name, Gallery.ondisk_files(GALLERY_FILE)[1].name, GALLERY_FILE}
    metadata = json.loads((source / METADATA_FILE).read_text(encoding="utf-8"))
    metadata.update({"class_names": gallery.class_names, "gallery_size": len(gallery),
                     "gallery_edits": [*metadata.get("gallery_edits", []), note]})
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(target) as tmp:
        staged = Path(scratch) / "source"
        shutil.copytree(source, staged)  # source may be target itself
        for item in staged.iterdir():
            if item.name not in ondisk and item.name != METADATA_FILE:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if (staged / Gallery.ondisk_files(GALLERY_FILE)[1].name).is_dir():
            gallery = gallery.with_ondisk_index(tmp / Gallery.ondisk_files(GALLERY_FILE)[1].name)
        gallery.save(tmp / GALLERY_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    return target


def _note(edit: Edit, source: str) -> dict:
    return {"change": edit.described(), "reason": edit.reason, "from": source, "by": getpass.getuser(),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}


def read_gallery(model: str) -> Gallery:
    """The gallery of a bundle folder or a registered version (``models:/NAME@alias``, ``models:/NAME/3``)."""
    if model.startswith("models:/"):
        with registry.bundle_copy(model) as bundle:
            gallery = Gallery.load(bundle / GALLERY_FILE)
            return gallery.kept(np.ones(len(gallery), bool)) if gallery.ondisk_dir else gallery  # its copy goes
    if not (Path(model) / GALLERY_FILE).is_file():
        raise BundleError(f"{model}: not a model bundle (no {GALLERY_FILE}); give a bundle folder or models:/NAME@ALIAS")
    return Gallery.load(Path(model) / GALLERY_FILE)


def edit_bundle(folder: str | os.PathLike, edit: Edit) -> dict:
    """Apply ``edit`` to a bundle folder's gallery, rewriting the bundle atomically."""
    folder = Path(folder)
    gallery = read_gallery(str(folder))
    after = edited(gallery, edit)
    write_bundle(folder, folder, after, _note(edit, str(folder)))
    return {"bundle": str(folder), "change": edit.described(), "classes": len(after.class_names), "images": len(after)}


def version_uri(model_name: str, source: str) -> str:
    """``models:/NAME/3`` for a version number, ``models:/NAME@alias`` for an alias."""
    return f"models:/{model_name}/{source}" if str(source).isdigit() else f"models:/{model_name}@{source}"


def edit_registered(model_name: str, source: str, edit: Edit, register: RegisterConfig | None = None) -> dict:
    """Apply ``edit`` to the gallery of version (or alias) ``source`` of ``model_name`` and register the result as a
    new version, in a run of the source run's experiment; it becomes champion when :func:`edit_decision` says so
    (through :func:`pipelines.registry.place_enrolled`). Returns the version, its alias and the gate's reason."""
    base = registry.version_of(version_uri(model_name, source))
    champion = registry.alias_version(model_name, CHAMPION)
    tags = {"gallery_edit_from": str(base.version)}
    experiment_id = client().get_run(base.run_id).info.experiment_id if base.run_id else ensure_experiment("siamese")
    note = _note(edit, f"{model_name}/{base.version}")
    with (registry.bundle_copy(f"models:/{model_name}/{base.version}") as bundle,
          tempfile.TemporaryDirectory() as tmp):
        gallery = Gallery.load(bundle / GALLERY_FILE)
        keep, names_after = planned(gallery, edit)
        removed = sorted(set(gallery.class_names) - set(edit.renames) - {names_after[i] for i in np.flatnonzero(keep)})
        figures = None if removed else same_queries(gallery, keep, names_after)
        promote, why = edit_decision(str(base.version), None if champion is None else str(champion.version),
                                     bool(removed), figures)
        after = edited(gallery, edit)
        new_bundle = write_bundle(bundle, Path(tmp) / "bundle", after, note)
        run_name = f"gallery-edit-of-v{base.version}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        with tracked_run(lambda: PipelineRun.create(experiment_id, run_name, tags)) as scope:
            scope.stage = "gallery-edit"
            run = scope.run
            run.log_metrics({"gallery_size": len(after), "classes": len(after.class_names),
                             "removed_images": int((~keep).sum()), "removed_classes": len(removed)})
            run.client.log_dict(run.run_id, {**note, "counts": dict(Counter(after.class_names[c] for c in after.labels))
                                             if edit.public is None else {}}, "gallery-edit.json")
            version = registry.register_bundle(run.run_id, model_name, new_bundle,
                                               {**tags, "gate.decision": CHAMPION if promote else "none", "gate.reason": why})
            registry.describe_version(model_name, version, card(model_name, version, str(base.version), note, why,
                                                                None if edit.public else base.description))
    alias = None
    if promote:
        try:
            staged = registry.place_enrolled(model_name, version, True, register, f"gallery edit: {edit.reason}")
        except RegistryError as exc:
            raise RegistryError(f"version {version} registered; {exc}") from None
        alias = "challenger" if staged is not None else CHAMPION
    return {"model_name": model_name, "version": version, "from": str(base.version), "alias": alias, "gate": why,
            "change": edit.described(), "classes": len(after.class_names), "images": len(after)}


def card(model_name: str, version: str, source: str, note: dict, gate: str, source_card: str | None) -> str:
    """A gallery edit's model card: what changed, why, by whom, from which version, the gate's checks."""
    lines = [f"# {model_name} version {version}", "",
             f"**Gallery edit of version {source}:** {note['change']}.", "",
             f"**Why:** {note['reason']} (by {note['by']}, {note['at']}).", "",
             f"**Gate:** {gate}.", "",
             f"Same network as version {source}, no retraining; only its gallery changed."]
    if source_card:
        lines += ["", f"## Version {source}'s card", "", source_card]
    return "\n".join(lines)
