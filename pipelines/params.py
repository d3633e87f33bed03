"""params.yaml: every pipeline knob, validated into typed sections."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

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
from siamese_core.metrics import flatten
from siamese_core.sharding import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_SHARD_SIZE
from siamese_core.validation import IMBALANCE_RATIO, MIN_SIDE, validate_dataset

DEFAULT_PARAMS = Path("params.yaml")
PRESETS = Path(__file__).resolve().parent / "presets"
SHIPPED = PRESETS / "shipped" / "params.yaml"  # not a preset: the values params.yaml ships with
log = logging.getLogger(__name__)


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
        return validate_dataset(train_dir or self.train_dir, test_dir or self.test_dir, open_set=self.open_set,
                                strict=self.strict, imbalance_ratio=self.imbalance_ratio, min_side=self.min_side)


class RegisterConfig(Section):
    """MLflow experiment, registered model name and the champion gate."""

    experiment: str = "siamese"
    model_name: str = "siamese-recognizer"
    metric: str = Field("top1", description="Evaluation metric the champion gate compares.")
    greater_is_better: bool = True
    rollout: Literal["direct", "shadow", "canary"] = Field(
        "direct", description="How a version that passes the gate reaches traffic: direct (it becomes champion), "
        "shadow (challenger, run on a copy of live traffic) or canary (challenger, answering canary_share of clients).")
    canary_share: float = Field(0.1, gt=0, lt=1, description="Share of client keys the canary answers.")
    rollback_margin: float = Field(0.05, ge=0, le=1, description="The challenger is rolled back when its error or "
                                   "unknown rate is over the champion's by more than this.")
    rollback_min_requests: int = Field(50, ge=1, description="Challenger requests before the rollback rule applies.")
    promote_min_requests: int = Field(200, ge=0, description="Challenger requests `siamese promote` needs.")
    promote_min_agreement: float = Field(0.8, ge=0, le=1, description="Share of images on which both versions "
                                         "answered the same class that `siamese promote` needs.")
    promote_min_keys: int = Field(20, ge=0, le=128, description="Distinct client keys the challenger must have "
                                  "answered before `siamese promote` (128 at most: each replica publishes that many).")
    evidence_key_cap: int = Field(10, ge=1, description="The most requests, and images, one client key adds to a "
                                  "rollout's counts on each replica: no one client makes the evidence or the rollback.")


class ComputeConfig(Section):
    """Where large embedding jobs run: this process, or a Dask cluster in shards of files."""

    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786) for gallery, evaluation and enrolment "
        "embedding; $SIAMESE_DASK_ADDRESS overrides it; null runs in this process.")
    shard_size: int = Field(DEFAULT_SHARD_SIZE, ge=1, description="Image files per shard sent to a worker.")
    dask_connect_timeout: float = Field(
        DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=600,
        description="Seconds to wait for the Dask scheduler to answer; then a one-line error names the address.")


class DriftRules(Section):
    """When the monitoring flow calls the traffic drifted: any one rule over its limit, significant at ``alpha``,
    fires the drift event."""

    unknown_rate_max: float = Field(0.25, ge=0, le=1, description="Share of answers the clients got as 'unknown' "
                                    "above which the traffic holds unknown classes (tested against the reference's "
                                    "rate).")
    distance_shift_max: float = Field(0.3, ge=0, le=1, description="Kolmogorov-Smirnov statistic between the "
                                      "nearest distances of the window and of the test split.")
    embedding_drift_max: float = Field(0.75, ge=0.5, le=1, description="ROC AUC of a classifier telling the "
                                       "window's embeddings from the reference sample (0.5: no drift).")
    class_mix_max: float = Field(0.5, ge=0, le=1, description="Jensen-Shannon distance between the predicted-class "
                                 "mix of the window and of the test split.")
    alpha: float = Field(0.01, gt=0, lt=1, description="Significance: a figure over its limit fires only when its "
                         "test against the reference gives a p-value under this.")


class MonitoringConfig(Section):
    """The inference log, the review queue and the monitoring flow."""

    log_uri: str | None = Field("logs/inference", description="Folder or s3:// URI of the inference log "
                                "(Parquet, partitioned by date); $SIAMESE_INFERENCE_LOG overrides it; null: no log.")
    log_embeddings: bool = Field(False, description="Also log each query's embedding (float16): embedding drift needs it.")
    log_images: bool = Field(False, description="Keep the images of answers that need review in review_dir "
                             "(off by default: the log holds hashes, not images).")
    review_dir: str = Field("review", description="The review queue: pending/<suggested label>/, then labelled/<label>/.")
    review_margin: float = Field(0.1, ge=0, description="An answer whose second class is this close to the first "
                                 "goes to review, as every unknown does.")
    queue_size: int = Field(10000, ge=1, description="Records waiting to be written; beyond it they are dropped "
                            "and counted, never blocking a request.")
    flush_records: int = Field(512, ge=1, description="Records per Parquet file at most.")
    flush_seconds: float = Field(5.0, gt=0, description="The longest a record waits before it is written.")
    window_hours: float = Field(24.0, gt=0, description="The monitoring flow's window of the log.")
    min_records: int = Field(30, ge=1, description="Fewer records in the window: figures are reported, no rule fires.")
    cron: str = Field("0 * * * *", description="When the monitoring deployment runs.")
    rules: DriftRules = Field(default_factory=DriftRules)

    def log_location(self) -> str | None:
        """Where the inference log goes: ``$SIAMESE_INFERENCE_LOG``, else ``log_uri`` (None: no log)."""
        return os.environ.get("SIAMESE_INFERENCE_LOG") or self.log_uri


class ServingConfig(Section):
    """How `siamese serve` groups concurrent requests into one forward pass, how much work it takes on and for how long,
    and whom a canary counts as one client."""

    max_batch_images: int = Field(64, ge=1, le=1024, description="Images of concurrent requests recognised "
                                  "together at most.")
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="How long a batch waits for more requests once "
                               "one is there; 0: it takes what is queued while the previous batch runs.")
    tf_threads: int = Field(0, ge=0, le=256, description="Threads of one forward pass; 0: one per core.")
    client_key_header: str | None = Field(
        None, pattern=r"^[A-Za-z0-9-]{1,64}$", description="The header a trusted proxy in front of the replicas sets "
        "to the client's identity, read as the canary's client key; null: the connection's address. Name it only "
        "when every request comes through that proxy, which replaces any value the client sent.")
    queue_images: int = Field(256, ge=1, le=100_000, description="Images taken on and not yet answered at most; a "
                              "request that would pass it is answered 503 with Retry-After at once.")
    deadline_ms: float = Field(10_000, gt=0, le=600_000, description="A request's time from its arrival: one the queue "
                               "ahead says cannot be answered in time, or still unanswered when it passes, gets 503.")
    decode_threads: int = Field(2, ge=1, le=64, description="Threads decoding requests' images, apart from the "
                                "forward pass: a heavy request holds one of them, never the recogniser.")
    max_header_bytes: int = Field(65_536, ge=1024, le=16_777_216, description="A request's head (request line and "
                                  "headers) at most; a larger one is answered 431 and its connection closed.")
    header_seconds: float = Field(10.0, gt=0, le=600, description="Time for a connection to send a request's head; "
                                  "a slower one is answered 408 and closed.")
    body_seconds: float = Field(30.0, gt=0, le=3600, description="Time for a request's body to arrive; a slower "
                                "one is answered 408 and closed.")
    max_connections: int = Field(1000, ge=1, le=1_000_000, description="Open connections and requests in progress at "
                                 "most (uvicorn's limit_concurrency); a request past it is answered 503.")
    drain_seconds: float = Field(10.0, ge=0, le=600, description="On SIGTERM: how long requests in progress may take "
                                 "to be answered before the server stops (their log records are written either way).")
    code_mismatch: Literal["warn", "refuse"] = Field(
        "warn", description="When a version was registered with other code than the server runs (its code.sha256 "
        "tag): warn in one line and serve it with the running code, or refuse to load it. `mlflow models serve` runs "
        "the version's stored code.")


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
            None, description="A file of pipelines/presets/ (seed, fast-cpu, fewshot-cpu, photos-cpu) whose keys replace "
            "those params.yaml holds at their shipped values; a key you changed, and --set, win (one line names both)."
        )
        data: DataConfig = Field(default_factory=DataConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
        compute: ComputeConfig = Field(default_factory=ComputeConfig)
        monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
        serving: ServingConfig = Field(default_factory=ServingConfig)

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


def preset_keys(name: str | None) -> dict[str, Any]:
    """The dotted keys preset ``name`` sets, with its values (those of a preset it ``extends`` included)."""
    return flatten(with_preset({}, name))


def shipped_keys() -> dict[str, Any]:
    """The dotted keys presets set, with the values params.yaml ships with (pipelines/presets/shipped/)."""
    return flatten(yaml.safe_load(SHIPPED.read_text(encoding="utf-8")))


def over_params(data: dict[str, Any], preset: dict[str, Any], shipped: dict[str, Any]
                ) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Params sections ``data`` with a preset's dotted keys where ``data`` still holds the ``shipped`` value;
    a key changed from it (in params.yaml or by ``dvc exp run -S``) is the user's and stays.

    Returns the merged sections, the keys replaced ``{key: (old, new)}`` (among them any the user set to the
    shipped value: that cannot be told apart) and the keys kept ``{key: (the user's, the preset's)}``.
    """
    merged = copy.deepcopy(data)
    replaced, kept = {}, {}
    for key, value in preset.items():
        *sections, name = key.split(".")
        node = merged
        for section in sections:
            node = node.setdefault(section, {})
        old = node.get(name)
        if old == value:
            continue
        if key in shipped and old != shipped[key]:
            kept[key] = (old, value)
        else:
            node[name] = value
            replaced[key] = (old, value)
    return merged, replaced, kept


def preset_note(name: str, replaced: dict[str, tuple[Any, Any]], kept: dict[str, tuple[Any, Any]]) -> str:
    """One line naming the keys preset ``name`` replaced in params.yaml and those it left as the user set them."""
    def show(value: Any) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    parts = []
    if replaced:
        parts.append(f"set {len(replaced)} key(s) params.yaml holds at their shipped values: "
                     + ", ".join(f"{key} {show(old)} -> {show(new)}" for key, (old, new) in replaced.items()))
    if kept:
        parts.append(f"kept {len(kept)} you changed: "
                     + ", ".join(f"{key} {show(yours)} (preset: {show(its)})" for key, (yours, its) in kept.items()))
    return (f"preset {name} " + "; ".join(parts) + ". A key set to its shipped value cannot be told from one "
            "left alone: to keep such a value, pass it with --set, or copy the preset's keys into params.yaml and "
            "set preset to null")


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> PipelineParams:
    """Read params.yaml (or ``$SIAMESE_PARAMS``), apply its preset (:func:`over_params`: keys the user changed
    win), then ``--set`` style overrides, which win over both. One logged line names what the preset replaced
    and what it left.

    A ``preset`` override selects a preset too.
    """
    file = Path(path or os.environ.get("SIAMESE_PARAMS") or DEFAULT_PARAMS)
    overrides = dict(overrides or {})
    data = load_config(file, PipelineParams).model_dump()
    data["preset"] = overrides.pop("preset", data["preset"])
    merged, replaced, kept = over_params(data, preset_keys(data["preset"]), shipped_keys())
    params = validate_config(PipelineParams, merged, str(file))
    params = apply_overrides(params, overrides) if overrides else params
    final = flatten(params.model_dump())
    replaced = {key: change for key, change in replaced.items() if final.get(key) == change[1]}  # not --set after
    kept = {key: change for key, change in kept.items() if final.get(key) == change[0]}
    if replaced or kept:
        log.warning(preset_note(data["preset"], replaced, kept))
    return params


def library_config(params_path: str | os.PathLike | None, preset: str | None, overrides: list[str]) -> Config:
    """The library config of ``siamese train``: the seed's defaults, or a params file's (:func:`load_params`),
    with a preset and ``--set`` overrides (``--set preset=NAME`` selects the preset, as params.yaml and ``dvc exp
    run -S`` do); ``--set`` wins over both."""
    settings = parse_set_options(overrides)
    preset = settings.pop("preset", preset)
    if params_path:
        return load_params(params_path, {**settings, "preset": preset} if preset else settings).core()
    return apply_overrides(preset_config(Config(), preset), settings)
