"""The stage table, read from dvc.yaml: the one place that says what each stage reads and writes.

``dvc repro`` runs the stages from it; the Prefect flows read the same declarations to
place each stage's outputs in the run's workspace and to key their cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from siamese_core.errors import ConfigError

from .params import PipelineParams

DVC_FILE = "dvc.yaml"
_REFERENCE = re.compile(r"\$\{([\w.]+)\}")


def param_value(params: PipelineParams, key: str) -> Any:
    """The value of a dotted params key (``train.epochs``, or a whole section ``train``), JSON-ready."""
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def resolve(template: str, params: PipelineParams) -> str:
    """A dvc.yaml path with its ``${section.key}`` references filled in from the params."""
    return _REFERENCE.sub(lambda m: str(param_value(params, m.group(1))), template)


def _paths(entries: list) -> tuple[str, ...]:
    """Path strings of a deps/outs list, whose entries are strings or ``{path: options}``."""
    return tuple(next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or [])


@dataclass(frozen=True)
class StageSpec:
    """What dvc.yaml declares for one stage; paths may hold ``${section.key}`` references."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]

    def resolved_deps(self, params: PipelineParams) -> list[str]:
        return [resolve(dep, params) for dep in self.deps]

    def resolved_outs(self, params: PipelineParams) -> list[str]:
        return [resolve(out, params) for out in self.outs]


def load_stages(path: str | os.PathLike = DVC_FILE) -> dict[str, StageSpec]:
    """The stages of a dvc.yaml, in pipeline order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no dvc.yaml here; run from the project root (the folder of params.yaml)")
    stages = yaml.safe_load(path.read_text(encoding="utf-8")).get("stages", {})
    return {
        name: StageSpec(
            name,
            entry["cmd"],
            _paths(entry.get("deps")),
            tuple(p for p in entry.get("params", []) if isinstance(p, str)),
            _paths(entry.get("outs")) + _paths(entry.get("metrics")) + _paths(entry.get("plots")),
        )
        for name, entry in stages.items()
    }
