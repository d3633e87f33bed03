"""Corrections back into the data: labelled review images become training images, with a manifest.

The review queue (``monitoring.review_dir``) holds ``pending/<suggested label>/<request>-<row>.<ext>``
with a ``.json`` beside each image saying what the model answered. A person moves each image (and
its ``.json``) to ``labelled/<true label>/``, new class names allowed. :func:`import_feedback`
copies them into the training folder as ``<label>/feedback-<sha256 prefix><ext>``: every image is
checked first and nothing is copied when one is bad, an image already there is skipped, and no
existing file is ever rewritten. A manifest ``feedback/<batch>.json`` records which requests, when
and by whom; the imported files move to ``imported/<batch>/`` in the review folder; the data folder
is then ``dvc add``-ed, so the next training sees a new data version and logs the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siamese_core.data import IMAGE_SUFFIXES, decode_image
from siamese_core.errors import DatasetError, ImageError
from siamese_core.io import atomic_path

from .files import write_json

FEEDBACK_DIR = Path("feedback")


def _labelled_images(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder of labelled review images (<label>/<image>)")
    found = [(label.name, image) for label in sorted(folder.iterdir()) if label.is_dir() and not label.name.startswith(".")
             for image in sorted(label.iterdir()) if image.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise DatasetError(f"{folder}: no images in <label>/ sub-folders; move reviewed images there first")
    return found


def dvc_target(folder: Path) -> Path | None:
    """The DVC-tracked folder holding ``folder`` (the one with a ``.dvc`` file beside it), if any."""
    for candidate in (folder.resolve(), *folder.resolve().parents):
        if candidate.with_name(candidate.name + ".dvc").is_file():
            return candidate
    return None


def import_feedback(labelled: str | os.PathLike, train_dir: str | os.PathLike, by: str, dvc: bool = True) -> dict:
    """Add the labelled review images to ``train_dir``; returns the manifest (with ``manifest`` and ``dvc`` paths)."""
    labelled, train_dir = Path(labelled), Path(train_dir)
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: the training folder does not exist")
    if not by.strip():
        raise DatasetError("--by: say who labelled these images; the manifest keeps it")
    items: list[dict[str, Any]] = []
    for label, image in _labelled_images(labelled):
        try:
            decode_image(image, 8)
        except ImageError as exc:
            raise ImageError(f"{exc}; nothing was imported") from None
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        sidecar = image.with_suffix(".json")
        try:
            answered = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        except ValueError as exc:
            raise DatasetError(f"{sidecar}: not the JSON the review queue wrote ({exc}); nothing was imported") from None
        items.append({"label": label, "source": str(image), "sha256": digest,
                      "file": str(train_dir / label / f"feedback-{digest[:16]}{image.suffix.lower()}"),
                      "request_id": answered.get("request_id"), "model_version": answered.get("model_version"),
                      "model_answer": answered.get("label"), "answered_at": answered.get("time")})
    now = datetime.now(UTC)
    batch = f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(''.join(i['sha256'] for i in items).encode()).hexdigest()[:8]}"
    added = []
    for item in items:
        target = Path(item["file"])
        if target.exists():
            continue  # the same image, imported before: never rewritten
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(item["source"], tmp)
        added.append(item)
    manifest = {"batch": batch, "imported_at": now.isoformat(), "imported_by": by, "into": str(train_dir),
                "images": added, "skipped_already_present": len(items) - len(added),
                "classes": sorted({i["label"] for i in added})}
    manifest_file = FEEDBACK_DIR / f"{batch}.json"
    write_json(manifest_file, manifest)
    done = labelled.parent / "imported" / batch
    for item in items:
        source = Path(item["source"])
        for moved in (source, source.with_suffix(".json")):
            if moved.exists():
                (done / item["label"]).mkdir(parents=True, exist_ok=True)
                os.replace(moved, done / item["label"] / moved.name)
    tracked = dvc_target(train_dir) if dvc else None
    if tracked is not None and added:
        subprocess.run([sys.executable, "-m", "dvc", "add", "-q", os.path.relpath(tracked)], check=True)
    return {**manifest, "manifest": str(manifest_file), "dvc": None if tracked is None else f"{tracked}.dvc"}


def feedback_batches(train_dir: str | os.PathLike) -> list[tuple[dict, str]]:
    """The manifests of the batches imported into ``train_dir`` still present there, with each manifest's sha256."""
    found = []
    for file in sorted(FEEDBACK_DIR.glob("*.json")) if FEEDBACK_DIR.is_dir() else []:
        text = file.read_bytes()
        manifest = json.loads(text)
        if Path(manifest.get("into", "")) == Path(train_dir) and any(Path(i["file"]).exists() for i in manifest["images"]):
            found.append((manifest, hashlib.sha256(text).hexdigest()))
    return found
