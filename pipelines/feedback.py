"""Corrections back into the data: labelled review images become training images, with a manifest.

The review queue (``monitoring.review_dir``) holds ``pending/<suggested label>/<time>-<sha256 prefix>-<row>.<ext>``
with a ``.json`` beside each image saying what the model answered. A person moves each image (and its ``.json``)
to ``labelled/<true label>/``, new class names allowed. :func:`import_feedback` first checks every class folder
and file, and refuses, one line per problem: links, files that are not regular files, names that are no fit class
or file names (:func:`name_problem`, the one rule for every name that comes from outside), a class that differs
only in case from another, one image in two classes, images that do not decode. Nothing is copied unless all pass.
It then copies the images, through a staging folder beside the training folder, as
``<label>/feedback-<sha256 prefix><ext>`` (an image already there is skipped; no existing file is ever
rewritten), and in one step that an interrupt waits for: writes the manifest ``feedback/<batch>.json`` (which
requests, when and by whom), moves the images into place and the originals to ``imported/<batch>/`` in the review
folder. The data folder is then ``dvc add``-ed, so the next training sees a new data version and logs the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siamese_core.data import IMAGE_SUFFIXES, decode_image, printable
from siamese_core.errors import DatasetError, ImageError, OutputError
from siamese_core.io import interrupts_deferred

from .files import write_json

FEEDBACK_DIR = Path("feedback")
MAX_NAME_LENGTH = 100  # characters; and at most 255 bytes in UTF-8, what most file systems allow
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10))})
WINDOWS_RESERVED = frozenset('<>:"|?*')


def shown(name: object) -> str:
    """``name`` for a one-line message: control and invisible characters escaped, bytes that are not UTF-8 as
    ``\\xNN``, a long name cut short."""
    if not isinstance(name, str):
        return repr(name)
    text = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else f"\\u{ord(c):04x}" if unicodedata.category(c).startswith("C") else c for c in name)
    return text if len(text) <= MAX_NAME_LENGTH else f"{text[:60]}..."


def name_problem(name: object) -> str | None:
    """What makes ``name`` unfit as a class (a folder of the training data) or a file name there; None if fit.

    The one rule for every name that comes from outside: a reviewer's label, a folder or file of the review
    queue, a served class that names a review folder. A fit name is UTF-8 text of at most 100 characters (255
    bytes) with no path separator, no control or invisible formatting character (U+202E, for one, shows text
    reversed), not hidden (a leading dot, as ``.`` and ``..`` have) and not reserved on Windows, where the data
    may be checked out.
    """
    if not isinstance(name, str):
        return "not text"
    if not name.strip():
        return "empty"
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in name):  # how Python reads bytes that are not UTF-8
        return "not valid UTF-8"
    invisible = next((c for c in name if unicodedata.category(c).startswith("C")), None)
    if invisible is not None:
        return f"holds the control or invisible character U+{ord(invisible):04X}"
    if len(name) > MAX_NAME_LENGTH or len(name.encode()) > 255:
        return f"too long ({len(name)} characters; at most {MAX_NAME_LENGTH}, and 255 bytes in UTF-8)"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name.startswith("."):
        return "starts with a dot (hidden, or . and ..)"
    if name != name.strip() or name.endswith("."):
        return "starts or ends with a space, or ends with a dot (Windows drops them)"
    if WINDOWS_RESERVED & set(name) or name.split(".")[0].strip().upper() in WINDOWS_DEVICES:
        return 'reserved on Windows (a device name such as CON or NUL, or one of < > : " | ? *)'
    return None


def class_key(name: str) -> str:
    """What two class names that must not both exist share: the same letters, whatever their case or Unicode form."""
    return unicodedata.normalize("NFC", name).casefold()


def class_folders(folder: str | os.PathLike) -> list[str]:
    """The classes a folder holds: the names of its sub-folders that are not hidden."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry.name for entry in os.scandir(os.fspath(folder))
                  if entry.is_dir() and not entry.name.startswith("."))


def case_clash(name: str, known: dict[str, str]) -> str | None:
    """The problem with the class ``name`` beside the ``known`` ones (:func:`class_key` to name): another spelling."""
    other = known.get(class_key(name))
    return None if other in (None, name) else f"differs only in case or Unicode form from the class '{shown(other)}'"


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, its links followed, stays in ``root``."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def dvc_target(folder: Path) -> Path | None:
    """The DVC-tracked folder holding ``folder`` (the one with a ``.dvc`` file beside it), if any."""
    for candidate in (folder.resolve(), *folder.resolve().parents):
        if candidate.with_name(candidate.name + ".dvc").is_file():
            return candidate
    return None


@dataclass
class _Labelled:
    """A checked image of ``labelled/<label>/`` and its review-queue sidecar, if any."""

    label: str
    image: Path
    sidecar: Path | None
    sha256: str
    answered: dict


def _kind(mode: int) -> str:
    kinds = {stat.S_ISLNK: "a link", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device", stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, never through a link or from a FIFO or device; OSError unless a regular file."""
    if not stat.S_ISREG(mode := os.lstat(path).st_mode):
        raise OSError(f"{_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # and if it was swapped since: refused too
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise OSError(f"{_kind(mode)}, not a regular file")
        return file.read()


def _text(value: object) -> str | None:
    """A sidecar's field as text the manifest can always hold (what is not UTF-8 escaped)."""
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).encode("utf-8", "backslashreplace").decode()


def _checked_image(label: str, image: Path) -> _Labelled | str:
    """An image of a class folder (its names already checked) and its sidecar, read and checked: the item, or the
    problem in one line."""
    try:
        data = _read_regular(image)
        decode_image(data, 8)
    except OSError as exc:
        return f"{printable(image)}: {exc.strerror or exc}"
    except ImageError as exc:
        return f"{printable(image)}: {str(exc).removeprefix('<bytes>: ')}"
    sidecar = image.with_suffix(".json")
    answered: Any = {}
    try:
        if os.path.lexists(sidecar):
            answered = json.loads(_read_regular(sidecar))
    except OSError as exc:
        return f"{printable(sidecar)}: {exc.strerror or exc}"
    except ValueError:
        answered = None
    if not isinstance(answered, dict):
        return f"{printable(sidecar)}: not the JSON the review queue wrote"
    return _Labelled(label, image, sidecar if os.path.lexists(sidecar) else None, hashlib.sha256(data).hexdigest(),
                     answered)


def _class_problem(label: str, train_dir: Path, known: dict[str, str], beside: dict[str, list[str]]) -> str | None:
    """What is wrong with ``labelled/<label>/`` as a class of ``train_dir``, beside the ``known`` classes there and
    the labelled classes (:func:`class_key` to their names)."""
    target = train_dir / label
    others = [name for name in beside.get(class_key(label), []) if name != label]
    return (name_problem(label) or case_clash(label, known)
            or (f"differs only in case or Unicode form from the class '{shown(others[0])}' beside it" if others else None)
            or (None if inside(target, train_dir) else "in the training folder, a link leaving it")
            or (None if target.is_dir() or not os.path.lexists(target) else "in the training folder, not a folder"))


def _check_files(folder: Path, label: str, where: str, first_of: dict[str, _Labelled]) -> tuple[list[_Labelled],
                                                                                              list[str]]:
    """The files of the class folder ``labelled/<label>/`` (shown as ``where``) checked: its images to import, and
    the problems, one line each. ``first_of`` holds the first image of each sha256 met so far, in any class."""
    items, problems = [], []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path, mode, at = Path(entry.path), entry.stat(follow_symlinks=False).st_mode, f"{where}/{shown(entry.name)}"
        if (entry.name.startswith(".") and stat.S_ISREG(mode)) or path.suffix.lower() == ".json":
            continue  # hidden, or a sidecar: checked with its image
        if not stat.S_ISREG(mode):
            problems.append(f"{at}: {_kind(mode)}, not a regular file")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{at}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif problem := name_problem(entry.name):
            problems.append(f"{at}: file name {problem}")
        elif isinstance(item := _checked_image(label, path), str):
            problems.append(item)
        elif (first := first_of.setdefault(item.sha256, item)).label != label:
            problems.append(f"{at}: the same image as {printable(first.image)}, in the class '{shown(first.label)}'; "
                            "keep it in one class")
        else:
            items.append(item)
    return items, problems


def _check(labelled: Path, train_dir: Path) -> tuple[list[_Labelled], list[str]]:
    """Every class folder and file of ``labelled`` checked: the images to import, and the problems, one line each."""
    items: list[_Labelled] = []
    problems: list[str] = []
    known = {class_key(name): name for name in class_folders(train_dir)}
    folders = sorted(os.scandir(labelled), key=lambda entry: entry.name)
    beside: dict[str, list[str]] = {}
    for folder in folders:
        if folder.is_dir(follow_symlinks=False):
            beside.setdefault(class_key(folder.name), []).append(folder.name)
    first_of: dict[str, _Labelled] = {}
    for folder in folders:
        label, mode = folder.name, folder.stat(follow_symlinks=False).st_mode
        where = f"{printable(labelled)}/{shown(label)}"
        if label.startswith(".") and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            continue  # hidden (.DS_Store, an editor's folder): passed over, as a dataset scan does
        if not stat.S_ISDIR(mode):
            problems.append(f"{where}: {'a file' if stat.S_ISREG(mode) else _kind(mode)}, not a <class>/ folder")
            continue
        problem = _class_problem(label, train_dir, known, beside)
        if problem:
            problems.append(f"{where}: class {problem}")
            continue
        found, wrong = _check_files(Path(folder.path), label, where, first_of)
        items += found
        problems += wrong
    return items, problems


def _manifest_entry(item: _Labelled, train_dir: Path) -> dict[str, Any]:
    answered = item.answered
    return {"label": item.label, "source": printable(item.image), "sha256": item.sha256,
            "file": printable(train_dir / item.label / f"feedback-{item.sha256[:16]}{item.image.suffix.lower()}"),
            "request_id": _text(answered.get("request_id")), "model_version": _text(answered.get("model_version")),
            "model_answer": _text(answered.get("label")), "answered_at": _text(answered.get("time"))}


def _cannot_write(path: str | os.PathLike, exc: OSError) -> OutputError:
    return OutputError(f"{printable(path)}: cannot write it ({exc.strerror or exc}); nothing was imported")


def _prepare(added: list[dict], checked: list[_Labelled], staging: Path, done: Path) -> None:
    """Copy the images to add into ``staging/<label>/``, each read again and checked unchanged since the checks, and
    make the folders of ``done`` (private, as the review queue is) the originals will move to."""
    items = {item.sha256: item for item in checked}
    for entry in added:
        item = items[entry["sha256"]]
        try:
            data = _read_regular(item.image)
        except OSError as exc:
            raise DatasetError(f"{printable(item.image)}: {exc.strerror or exc}; nothing was imported") from None
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise DatasetError(f"{printable(item.image)}: changed during the import; nothing was imported")
        copy = staging / item.label / Path(entry["file"]).name
        try:
            copy.parent.mkdir(exist_ok=True)
            copy.write_bytes(data)
        except OSError as exc:
            raise _cannot_write(copy, exc) from exc
    for label in {item.label for item in checked}:
        try:
            for level in (done.parent, done, done / label):
                level.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(done / label, exc) from exc


def _commit(manifest_file: Path, manifest: dict, checked: list[_Labelled], staging: Path, train_dir: Path,
            done: Path) -> None:
    """Write the manifest, move the staged images into ``train_dir`` and the originals to ``done``: renames, which
    need no space, after the one write; an interrupt waits for the end."""
    with interrupts_deferred():
        write_json(manifest_file, manifest)
        for label in manifest["classes"]:
            if not (train_dir / label).exists():
                os.replace(staging / label, train_dir / label)  # a new class arrives whole
                continue
            for staged in (staging / label).iterdir():
                os.replace(staged, train_dir / label / staged.name)
        for item in checked:
            for moved in (item.image, item.sidecar):
                if moved is not None:
                    os.replace(moved, done / item.label / moved.name)


def import_feedback(labelled: str | os.PathLike, train_dir: str | os.PathLike, by: str, dvc: bool = True) -> dict:
    """Add the labelled review images to ``train_dir``; returns the manifest (with ``manifest`` and ``dvc`` paths)."""
    labelled, train_dir = Path(labelled), Path(train_dir)
    if not train_dir.is_dir():
        raise DatasetError(f"{printable(train_dir)}: the training folder does not exist")
    if not by.strip():
        raise DatasetError("--by: say who labelled these images; the manifest keeps it")
    if labelled.is_symlink() or not labelled.is_dir():
        raise DatasetError(f"{printable(labelled)}: no such folder of labelled review images (<label>/<image>; "
                           "not a link)")
    checked, problems = _check(labelled, train_dir)
    if problems:
        raise DatasetError(f"{printable(labelled)}: nothing was imported, {len(problems)} problem(s) to fix first:\n"
                           + "\n".join(f"  {problem}" for problem in problems))
    if not checked:
        raise DatasetError(f"{printable(labelled)}: no images in <label>/ sub-folders; move reviewed images there first")
    entries = [_manifest_entry(item, train_dir) for item in checked]
    added = list({e["file"]: e for e in entries  # an image already there is never rewritten
                  if not os.path.lexists(train_dir / e["label"] / Path(e["file"]).name)}.values())
    now = datetime.now(UTC)
    batch = f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(''.join(e['sha256'] for e in entries).encode()).hexdigest()[:8]}"
    manifest = {"batch": batch, "imported_at": now.isoformat(), "imported_by": _text(by), "into": printable(train_dir),
                "images": added, "skipped_already_present": len(entries) - len(added),
                "classes": sorted({e["label"] for e in added})}
    manifest_file = FEEDBACK_DIR / f"{batch}.json"
    done = labelled.parent / "imported" / batch
    if not inside(done.parent, labelled.parent):
        raise DatasetError(f"{printable(done.parent)}: a link leaving the review folder; nothing was imported")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".feedback-", suffix=".tmp", dir=train_dir.parent))
    except OSError as exc:
        raise _cannot_write(train_dir.parent, exc) from exc
    try:
        _prepare(added, checked, staging, done)
        _commit(manifest_file, manifest, checked, staging, train_dir, done)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tracked = dvc_target(train_dir) if dvc else None
    if tracked is not None and added:
        added_to_dvc = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", os.path.relpath(tracked)])
        if added_to_dvc.returncode != 0:
            raise DatasetError(f"dvc add {printable(tracked)} failed (exit status {added_to_dvc.returncode}); the "
                               f"images and {manifest_file} are in place: run it again")
    return {**manifest, "manifest": str(manifest_file), "dvc": None if tracked is None else f"{tracked}.dvc"}


def feedback_batches(train_dir: str | os.PathLike) -> list[tuple[dict, str]]:
    """The manifests of the batches imported into ``train_dir`` still present there, with each manifest's sha256."""
    found = []
    for file in sorted(FEEDBACK_DIR.glob("*.json")) if FEEDBACK_DIR.is_dir() else []:
        text = file.read_bytes()
        manifest = json.loads(text)
        if Path(manifest.get("into", "")) == Path(printable(train_dir)) and any(
                Path(i["file"]).exists() for i in manifest["images"]):
            found.append((manifest, hashlib.sha256(text).hexdigest()))
    return found
