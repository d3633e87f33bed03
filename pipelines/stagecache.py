"""A content-addressed cache of stage outputs for the Prefect flows (``dvc repro`` has DVC's own).

A stage's key (:func:`pipelines.pipeline.stage_key`) hashes its code (the modules it imports),
the values of its params keys and the content of the data folders and artifacts it reads. Entries are written whole to a temporary folder and renamed into
place, never changed after, so concurrent runs can share them: a run that finds an entry
links its files into its own workspace instead of running the stage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .files import copy_linked, read_json, write_json
from .pipeline import Stage

CACHE_ROOT = Path(".siamese-cache/stages")
RESULT_FILE = "result.json"


def _entry(name: str, key: str) -> Path:
    return CACHE_ROOT / name / key


def restore(stage: Stage, key: str, workspace: Path) -> dict | None:
    """Link a cached run's outputs into ``workspace``; returns the stage's result, or None on a miss."""
    entry = _entry(stage.name, key)
    if not (entry / RESULT_FILE).is_file():
        return None
    for out in stage.writes:
        target = workspace / out
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        copy_linked(entry / out, target)
    return read_json(entry / RESULT_FILE)


def store(stage: Stage, key: str, workspace: Path, result: dict) -> None:
    """Publish the stage's outputs in ``workspace`` as the entry for ``key`` (first writer wins)."""
    entry = _entry(stage.name, key)
    if entry.exists():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=entry.parent))
    try:
        for out in stage.writes:
            copy_linked(workspace / out, tmp / out)
        write_json(tmp / RESULT_FILE, result)
        try:
            os.rename(tmp, entry)
        except OSError:  # another run published the same key first: its entry is equal
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
