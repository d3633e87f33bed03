"""params.yaml: every pipeline knob, validated into typed sections."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from siamese_core.config import (
    Config,
    Section,
    apply_overrides,
    load_config,
    parse_set_options,
    validate_config,
)
from siamese_core.errors import ConfigError
from siamese_core.sharding import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_SHARD_SIZE
from siamese_core.validation import IMBALANCE_RATIO, MIN_SIDE

DEFAULT_PARAMS = Path("params.yaml")
PRESETS = Path(__file__).resolve().parent / "presets"


class DataConfig(Section):
    """Where the dataset lives: class folders, DVC-tracked, never written by the pipeline."""

    train_dir: str = "data/demo/train"
    test_dir: str = "data/demo/test"
    open_set: bool = Field(False, description="Allow test classes that are not in train (open-set evaluation).")
    strict: bool = Field(False, description="Treat the same image in train and test (leakage) as an error.")
    imbalance_ratio: float = Field(IMBALANCE_RATIO, gt=1, description="Warn when class sizes are further apart.")
    min_side: int = Field(MIN_SIDE, ge=1, description="Warn about images with a side under this many pixels.")
    heldout_dir: str | None = Field(
        "data/demo/heldout",
        description="Class folders never trained on: the evaluate stage scores them as unknown classes "
        "and enrols them in few-shot episodes; null skips both.",
    )

    def validation(self, train_dir: str | os.PathLike | None = None, test_dir: str | os.PathLike | None = None):
        """The dataset validation report of ``train_dir`` and ``test_dir`` (default: this section's folders),
        with this section's levels and limits: what the validate stage and ``siamese train`` check."""
        from siamese_core.validation import validate_dataset

        return validate_dataset(train_dir or self.train_dir, test_dir or self.test_dir, open_set=self.open_set,
                                strict=self.strict, imbalance_ratio=self.imbalance_ratio, min_side=self.min_side)


class RegisterConfig(Section):
    """MLflow experiment, registered model name and the champion gate."""

    experiment: str = "siamese"
    model_name: str = "siamese-recognizer"
    metric: str = Field("top1", description="Evaluation metric the champion gate compares.")
    greater_is_better: bool = True


class ComputeConfig(Section):
    """Where large embedding jobs run: this process, or a Dask cluster in shards of files."""

    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786) for gallery, evaluation and enrolment "
        "embedding; $SIAMESE_DASK_ADDRESS overrides it; null runs in this process.")
    shard_size: int = Field(DEFAULT_SHARD_SIZE, ge=1, description="Image files per shard sent to a worker.")
    dask_connect_timeout: float = Field(
        DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=600,
        description="Seconds to wait for the Dask scheduler to answer; then a one-line error names the address.")


class ScheduleConfig(Section):
    """When the retraining deployment runs."""

    cron: str = "0 3 * * 1"
    timezone: str = "UTC"


# "register" is a section of params.yaml; it shadows ABCMeta.register on the class, which nothing here uses.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register" in "PipelineParams" shadows', category=UserWarning)

    class PipelineParams(Config):
        """The whole params.yaml: the library's sections plus data, register and schedule."""

        preset: str | None = Field(
            None, description="A file of pipelines/presets/ (seed, fast-cpu, fewshot-cpu) whose keys replace those of params.yaml."
        )
        data: DataConfig = Field(default_factory=DataConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
        compute: ComputeConfig = Field(default_factory=ComputeConfig)

        def core(self) -> Config:
            """The library part of the params."""
            return Config.model_validate(self.model_dump(include=set(Config.model_fields)))


def preset_names() -> list[str]:
    """The presets shipped in pipelines/presets/."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def with_preset(data: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``data`` (params sections as dicts) with the keys of preset ``name`` replacing its own
    (a preset that ``extends`` another applies that one first)."""
    if not name:
        return data
    if name not in preset_names():  # a name, never a path: nothing outside pipelines/presets/ is read
        raise ConfigError(f"preset: unknown preset '{name}', expected one of {preset_names()}")
    path = PRESETS / f"{name}.yaml"
    keys = yaml.safe_load(path.read_text(encoding="utf-8"))
    base = keys.pop("extends", None)
    if base == name:
        raise ConfigError(f"preset {name}: it extends itself")
    return _merge(with_preset(data, base), keys)


def preset_config(base: Config, name: str | None) -> Config:
    """The library config ``base`` with the keys of preset ``name`` replacing its own."""
    return validate_config(Config, with_preset(base.model_dump(), name), f"preset {name}")


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> PipelineParams:
    """Read params.yaml (or ``$SIAMESE_PARAMS``), apply its preset, then ``--set`` style overrides.

    A ``preset`` override selects a preset too; the other overrides win over the preset.
    """
    file = Path(path or os.environ.get("SIAMESE_PARAMS") or DEFAULT_PARAMS)
    overrides = dict(overrides or {})
    data = load_config(file, PipelineParams).model_dump()
    data["preset"] = overrides.pop("preset", data["preset"])
    params = validate_config(PipelineParams, with_preset(data, data["preset"]), str(file))
    return apply_overrides(params, overrides) if overrides else params


def library_config(params_path: str | os.PathLike | None, preset: str | None, overrides: list[str]) -> Config:
    """The library config of ``siamese train``: the seed's defaults or a params file's, then a preset, then
    ``--set`` overrides (``--set preset=NAME`` selects the preset, as params.yaml and ``dvc exp run -S`` do)."""
    settings = parse_set_options(overrides)
    preset = settings.pop("preset", preset)
    base = load_params(params_path).core() if params_path else Config()
    return apply_overrides(preset_config(base, preset), settings)
