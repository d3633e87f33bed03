"""A content-addressed cache of stage outputs for the Prefect flows (``dvc repro`` has DVC's own).

A stage's key hashes what dvc.yaml says it depends on: its command, the values of its
params keys and the content of its deps (code and data from the project, artifacts from
the run's workspace). Entries are written whole to a temporary folder and renamed into
place, never changed after, so concurrent runs can share them: a run that finds an entry
links its files into its own workspace instead of running the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .dvcfile import StageSpec, param_value
from .files import content_hash, copy_linked, read_json, write_json
from .params import PipelineParams

CACHE_ROOT = Path(".siamese-cache/stages")
RESULT_FILE = "result.json"


def stage_key(spec: StageSpec, params: PipelineParams, workspace: Path, artifacts: set[str]) -> str:
    """The content key of running ``spec`` in ``workspace``; ``artifacts`` are the paths stages write."""
    deps = {}
    for dep in spec.resolved_deps(params):
        deps[dep] = content_hash(workspace / dep if dep in artifacts else dep)
    payload = {"stage": spec.name, "cmd": spec.cmd, "deps": deps,
               "params": {key: param_value(params, key) for key in spec.params}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _entry(name: str, key: str) -> Path:
    return CACHE_ROOT / name / key


def restore(spec: StageSpec, key: str, params: PipelineParams, workspace: Path) -> dict | None:
    """Link a cached run's outputs into ``workspace``; returns the stage's result, or None on a miss."""
    entry = _entry(spec.name, key)
    if not (entry / RESULT_FILE).is_file():
        return None
    for out in spec.resolved_outs(params):
        target = workspace / out
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        copy_linked(entry / out, target)
    return read_json(entry / RESULT_FILE)


def store(spec: StageSpec, key: str, params: PipelineParams, workspace: Path, result: dict) -> None:
    """Publish the stage's outputs in ``workspace`` as the entry for ``key`` (first writer wins)."""
    entry = _entry(spec.name, key)
    if entry.exists():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=entry.parent))
    try:
        for out in spec.resolved_outs(params):
            copy_linked(workspace / out, tmp / out)
        write_json(tmp / RESULT_FILE, result)
        try:
            os.rename(tmp, entry)
        except OSError:  # another run published the same key first: its entry is equal
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
