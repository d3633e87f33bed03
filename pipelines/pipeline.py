"""The stage table: what each stage reads and writes, and the code it runs, in one place.

Both drivers read it. ``dvc repro`` runs the stages of ``dvc.yaml``, which is written from this
table (``siamese dvc-yaml``); the Prefect flows run the same stages through
:mod:`pipelines.runner` and key their cache on the same inputs. A stage's code inputs are not
listed by hand: they are the modules its own module imports, followed through ``pipelines``
and ``siamese_core`` (imports inside functions included), plus the data files those modules read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from siamese_core.sharding import Sharder

from . import imports
from .files import content_hash
from .params import PipelineParams

# Outputs, relative to the workspace root (the project under ``dvc repro``, runs/<run>/ under a flow).
VALIDATION = Path("artifacts/validation.json")
VALIDATION_TEXT = Path("artifacts/validation.txt")
TRIPLETS = Path("artifacts/triplets.csv")
TRIPLETS_SUMMARY = Path("artifacts/triplets_summary.json")
TRAINED = Path("artifacts/train")
BUNDLE = Path("artifacts/bundle")
EVALUATION = Path("artifacts/evaluation.json")
REFERENCE = Path("artifacts/reference.npz")
REGISTRATION = Path("artifacts/registration.json")
REPORT = Path("artifacts/report.html")
METRICS = Path("metrics.json")
LOSS_PLOT = Path("plots/loss.csv")
PER_CLASS_PLOT = Path("plots/per_class.csv")
CONFUSION_PLOT = Path("plots/confusion.csv")
IMAGE_PLOTS = Path("plots/images")
HISTORY_FILE, RUN_FILE = "history.json", "run.json"


@dataclass(frozen=True)
class StageContext:
    """What a stage works with: the params, the workspace it reads and writes, the pipeline's MLflow run and
    the sharder for large embedding jobs."""

    params: PipelineParams
    workspace: Path
    tracking: Any  # pipelines.tracking.RunScope: imported lazily, as MLflow is slow to import
    sharder: Sharder | None = None  # where large embedding jobs go (a Dask cluster); None: this process

    def path(self, relative: Path) -> Path:
        """An output or artifact path inside the workspace."""
        return self.workspace / relative


@dataclass(frozen=True)
class Stage:
    """One stage: its params keys, the data folders it reads (``params.data`` fields), the artifacts of
    earlier stages it reads, and what it writes (``outs``; ``uncached`` are plot tables kept in git)."""

    name: str
    params: tuple[str, ...]
    data: tuple[str, ...]
    reads: tuple[Path, ...]
    outs: tuple[Path, ...]
    uncached: tuple[Path, ...] = ()
    metrics: tuple[Path, ...] = ()
    cacheable: bool = True  # False: it changes more than its outputs (the registry), so a flow always runs it

    @property
    def module(self) -> str:
        return f"pipelines.stages.{self.name}"

    @property
    def writes(self) -> tuple[Path, ...]:
        return self.outs + self.uncached + self.metrics

    def data_dirs(self, params: PipelineParams) -> list[str]:
        """The data folders this stage reads under ``params``; an optional folder set to null is left out."""
        folders = (getattr(params.data, field) for field in self.data)
        return [folder for folder in folders if folder]

    def code(self) -> list[str]:
        """The project files whose content this stage's behaviour depends on, relative to the project."""
        return imports.code_files(self.module)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("validate", ("data.train_dir", "data.test_dir", "data.open_set", "data.strict",
                       "data.imbalance_ratio", "data.min_side"),
          ("train_dir", "test_dir"), (), (VALIDATION, VALIDATION_TEXT)),
    Stage("triplets", ("preset", "data.train_dir", "model", "triplets", "train.seed", "evaluate.embed_batch_size"),
          ("train_dir",), (VALIDATION,), (TRIPLETS, TRIPLETS_SUMMARY)),
    Stage("train", ("preset", "data.train_dir", "data.test_dir", "data.heldout_dir", "model", "train",
                    "evaluate.fewshot_way"),
          ("train_dir", "test_dir", "heldout_dir"), (TRIPLETS,), (TRAINED,)),
    Stage("embed", ("preset", "data.train_dir", "model", "triplets", "train", "evaluate"),
          ("train_dir",), (TRAINED,), (BUNDLE,)),
    Stage("evaluate", ("preset", "data.train_dir", "data.test_dir", "data.heldout_dir", "evaluate"),
          ("train_dir", "test_dir", "heldout_dir"), (BUNDLE, TRAINED),
          (EVALUATION, REFERENCE, IMAGE_PLOTS), (LOSS_PLOT, PER_CLASS_PLOT, CONFUSION_PLOT), (METRICS,)),
    Stage("register", ("data.train_dir", "data.test_dir", "data.heldout_dir", "register"),
          ("train_dir", "test_dir"),
          (BUNDLE, TRAINED, EVALUATION, REFERENCE, METRICS, IMAGE_PLOTS, TRIPLETS_SUMMARY, VALIDATION, VALIDATION_TEXT,
           LOSS_PLOT, PER_CLASS_PLOT, CONFUSION_PLOT),
          (REGISTRATION, REPORT), cacheable=False),
)}


def param_value(params: PipelineParams, key: str) -> Any:
    """The value of a dotted params key (``train.epochs``, or a whole section ``train``), JSON-ready."""
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_key(stage: Stage, params: PipelineParams, workspace: Path) -> str:
    """The content key of running ``stage``: its code, params values, data folders and the artifacts it
    reads from ``workspace``. The flows' cache is keyed on it; DVC compares the same inputs from dvc.yaml."""
    payload = {
        "stage": stage.name,
        "code": {path: content_hash(imports.PROJECT / path) for path in stage.code()},
        "params": {key: param_value(params, key) for key in stage.params},
        "data": {folder: content_hash(folder) for folder in stage.data_dirs(params)},
        "reads": {str(path): content_hash(workspace / path) for path in stage.reads},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


DVC_HEADER = """\
# Written by `siamese dvc-yaml` from the stage table in pipelines/pipeline.py: do not edit.
# Each stage runs `siamese stage <name>`, the code the Prefect flows run. Its deps are the files
# of the code it imports (found by following its imports), the data folders params.yaml names
# and the artifacts of earlier stages. After setting an optional folder (data.heldout_dir) to
# null or back, run `siamese dvc-yaml` again. The data folders are DVC-tracked (data/demo.dvc);
# MLflow's own files (mlflow.db, mlartifacts/) are not outs of any stage. `dvc plots show`
# renders the evaluate stage's PNGs (plots/images) without loading anything from the network.
"""


def dvc_yaml(params: PipelineParams) -> str:
    """The text of dvc.yaml for ``params``: data folders as ``${data.<field>}`` (null ones left out)."""
    stages = {}
    for stage in STAGES.values():
        data = [f"${{data.{field}}}" for field in stage.data if getattr(params.data, field)]
        entry: dict[str, Any] = {
            "cmd": f"siamese stage {stage.name}",
            "deps": [*stage.code(), *data, *map(str, stage.reads)],
            "params": list(stage.params),
            "outs": [*map(str, stage.outs), *({str(path): {"cache": False}} for path in stage.uncached)],
        }
        if stage.metrics:
            entry["metrics"] = [{str(path): {"cache": False}} for path in stage.metrics]
        stages[stage.name] = entry
    body = yaml.safe_dump({"stages": stages, "plots": [str(IMAGE_PLOTS)]}, sort_keys=False, width=120)
    return DVC_HEADER + body
