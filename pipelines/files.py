"""File helpers of the pipeline: atomic JSON and CSV writers, DVC's content hash, linked copies."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from dvc_data.hashfile.hash import file_md5
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.tree import Tree

from siamese_core.io import atomic_path


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, header: list[str], rows) -> None:
    """Write a CSV table atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def content_hash(path: str | os.PathLike) -> str:
    """DVC's md5 of a file, or of a folder (``<md5>.dir``, the value dvc.lock records); "missing" if absent.

    ``__pycache__`` folders and ``.pyc`` files are left out, as .dvcignore leaves them out.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(str(path))
    if not path.is_dir():
        return "missing"
    tree = Tree()
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".pyc"):
                file = Path(root, name)
                tree.add(file.relative_to(path).parts, None, HashInfo("md5", file_md5(str(file))))
    tree.digest()
    return str(tree.hash_info.value)


def tree_sha256(path: str | os.PathLike, leave_out: frozenset[str] = frozenset()) -> str:
    """The sha256 of a folder: of every file in it, with its relative path, but those in ``leave_out``
    (relative POSIX paths)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in leave_out):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:  # in chunks: a model or gallery may be large
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return digest.hexdigest()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_linked(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file or folder to ``target`` (which must not exist), hard-linking files where possible.

    Safe for the pipeline's files, which are only ever replaced by rename, never edited in place.
    """
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))
