"""Tuning: the settings that score best on the user's own training folder within a time budget.

An Optuna study (seeded TPE sampler, median pruning on each epoch's validation objective) searches
:data:`SEARCH_SPACE`; the presets of :data:`COMPARED_PRESETS` are its first trials, so the winner is measured
against them on the same split. Trials are validated on a split of the training folder alone
(:func:`split_folder`); ``--test`` and ``--heldout`` score only the winner, at the end. The study lives in
Optuna's RDB storage (a SQLite file beside MLflow's), so a stopped study resumes; it is one MLflow run with
each trial a nested run. Trials are asked in rounds of ``parallel`` and told in order, serially (in a child
process, :mod:`pipelines.trial_process`, replaced as TensorFlow's memory grows) or on a Dask cluster, and a trial
is pruned against the trials of earlier rounds only: the same seed gives the same trials either way.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from siamese_core.config import Config, apply_overrides, validate_config
from siamese_core.data import ImageFolder, scan_folder
from siamese_core.errors import ConfigError, DatasetError
from siamese_core.metrics import few_shot_accuracy, flatten, proportion_half_width

from .files import copy_linked
from .params import DEFAULT_PARAMS, PipelineParams, load_params, over_params, shipped_keys, with_preset
from .process import import_tensorflow_quietly
from .tracking import client, end_run, ending, ensure_experiment, project_root, tracking_uri
from .trial_process import TrialProcess, TrialProcessDied, noting_interrupts, raise_if_interrupted

log = logging.getLogger(__name__)

FEWSHOT_WEIGHT = 0.5  # the objective: this share of 1-shot accuracy on unseen classes, the rest top-1
OBJECTIVE = ("0.5 x 1-shot accuracy on the validation classes (training classes the trial did not train on, "
             "each enrolled from one image) + 0.5 x top-1 accuracy on held-out images of the classes it trained on")
COMPARED_PRESETS = ("fast-cpu", "fewshot-cpu", "photos-cpu")  # seed needs ImageNet weights from Keras' cache
UNSEEN_SHARE = 0.25  # of the training classes, held out as the validation classes (2 at least)
IMAGE_SHARE = 0.2  # of each trained class's images (of those with 3 or more), held out as its validation images
FEWSHOT_WAY, EPISODES = 20, 200  # the 1-shot episodes (fewer ways when fewer validation classes)
PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 1}  # optuna.pruners.MedianPruner's settings
RECYCLE_GROWTH = 2**30  # bytes a trial process may grow by over its first trial before a fresh one takes over
STUDY_SCHEMA = 2  # part of the study's name: a change to the split, the objective or its intervals starts a new study


@dataclass(frozen=True)
class Dimension:
    """One axis of the search: a config key with ``choices`` or a ``low``..``high`` range, or a name for several
    keys set together (``options``: a name for each set of values)."""

    name: str
    help: str
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def keys(self) -> set[str]:
        """The config keys this dimension sets."""
        return {key for values in self.options.values() for key in values} if self.options else {self.name}

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this dimension, drawn by the study's sampler."""
        if self.options or self.choices:
            return trial.suggest_categorical(self.name, list(self.options or self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def settings(self, value: Any) -> dict[str, Any]:
        """The config keys and values one value of this dimension stands for."""
        return dict(self.options[value]) if self.options else {self.name: value}

    def value_of(self, settings: dict[str, Any]) -> Any:
        """The value of this dimension that flat ``settings`` hold; None when they hold none of its values."""
        if self.options:
            return next((name for name, keys in self.options.items()
                         if all(settings.get(key) == value for key, value in keys.items())), None)
        value = settings.get(self.name)
        if self.choices:
            return value if value in self.choices else None
        return value if value is not None and self.low <= value <= self.high else None

    def text(self) -> str:
        """The values, as the docs table shows them."""
        if self.options:
            return "; ".join(f"{name}: " + ", ".join(f"{key.split('.')[-1]}={value}" for key, value in keys.items())
                             for name, keys in self.options.items())
        if self.choices:
            return ", ".join(str(choice) for choice in self.choices)
        return f"{self.low:g} to {self.high:g}" + (" (log scale)" if self.log else "")


def _affine(size: float, rotations: bool) -> dict[str, Any]:
    prefix = "train.augment."
    return {prefix + "rotation": round(100 * size), prefix + "shift": size, prefix + "zoom": size,
            prefix + "shear": size, prefix + "flip": "none", prefix + "rotations_as_classes": rotations,
            prefix + "mirrors_as_classes": False}


def _network(backbone: str, size: int, stride: int = 1) -> dict[str, Any]:
    return {"model.backbone": backbone, "model.weights": "imagenet" if backbone == "efficientnet_lite0" else None,
            "model.input_size": size, "model.stem_stride": stride}


# What the presets differ in, in one place: the docs render it (docs/how-to/tuning.md) and every compared preset
# is a point of it (tests/test_tuning.py).
SEARCH_SPACE: tuple[Dimension, ...] = (
    Dimension("network", "backbone and input size", options={
        "small_cnn-32": _network("small_cnn", 32), "small_cnn-56": _network("small_cnn", 56),
        "small_cnn-112-stride2": _network("small_cnn", 112, 2),
        "efficientnet_lite0-224": _network("efficientnet_lite0", 224)}),
    Dimension("model.pooling", "pooling of the feature map", choices=("avg", "gem")),
    Dimension("model.embedding_dim", "embedding size", choices=(64, 128, 256)),
    Dimension("train.mining", "online mining in P x K batches", choices=("batch_all", "batch_hard", "semihard")),
    Dimension("model.margin", "triplet margin", low=0.05, high=0.5, log=True),
    Dimension("train.classes_per_batch", "P of the P x K batches", choices=(8, 16, 32)),
    Dimension("train.learning_rate", "learning rate", low=1e-4, high=3e-3, log=True),
    Dimension("train.lr_schedule", "learning-rate schedule", choices=("constant", "cosine", "step")),
    Dimension("train.epochs", "epochs (pruning stops a poor trial early)", low=4, high=30, integer=True),
    Dimension("augmentation", "training augmentation", options={
        "none": _affine(0.0, False), "affine": _affine(0.1, False), "affine+rotations": _affine(0.1, True),
        "strong+rotations": _affine(0.2, True)}),
    Dimension("evaluate.test_time_views", "test-time views per image", choices=(1, 5, 9)),
    Dimension("evaluate.match", "matching of a query", choices=("nearest_image", "class_mean")),
)


def space_table(space: tuple[Dimension, ...] = SEARCH_SPACE) -> str:
    """The search space as a Markdown table (the docs page and the study's MLflow run show it)."""
    rows = [f"| `{d.name}` | {d.help} | {d.text()} |" for d in space]
    return "\n".join(["| dimension | what | values |", "|---|---|---|", *rows])


def dotted_pins(pins: dict[str, Any], base: PipelineParams) -> dict[str, Any]:
    """``--set`` style ``pins`` with bare keys (``epochs``) written as the dotted keys they set (``train.epochs``)."""
    flat = flatten(base.model_dump())
    named = {}
    for key, value in pins.items():
        matches = [k for k in flat if k == key or k.endswith("." + key)]
        named[matches[0] if len(matches) == 1 else key] = value
    return named


def free_space(pins: dict[str, Any]) -> tuple[Dimension, ...]:
    """The dimensions still searched: a pinned key (``--set``) removes the dimension that sets it."""
    return tuple(d for d in SEARCH_SPACE if not d.keys() & set(pins))


def trial_params(base: PipelineParams, point: dict[str, Any], pins: dict[str, Any], preset: str | None = None
                 ) -> PipelineParams:
    """The params a trial trains with: ``base``, the keys of ``preset`` (a compared preset's trial), those of
    the trial's ``point`` (dimension -> value), then the ``pins``, which win."""
    data = with_preset(base.model_dump(), preset)
    settings = {key: value for d in SEARCH_SPACE if d.name in point for key, value in d.settings(point[d.name]).items()}
    params = validate_config(PipelineParams, data, f"preset {preset}" if preset else "tuning")
    return apply_overrides(params, {**settings, **pins}).model_copy(update={"preset": None})


def preset_point(name: str, base: PipelineParams, space: tuple[Dimension, ...]) -> dict[str, Any] | None:
    """Preset ``name`` as a point of ``space`` (over ``base``); None when one of its values is outside it."""
    flat = flatten(with_preset(base.model_dump(), name))
    point = {d.name: d.value_of(flat) for d in space}
    return None if any(value is None for value in point.values()) else point


def split_folder(folder: ImageFolder, seed: int) -> dict[str, dict[str, list[str]]]:
    """The validation split of a training folder: ``{"train" | "known" | "unseen": {class: [paths]}}``.

    A quarter of the classes (:data:`UNSEEN_SHARE`, 2 at least) are ``unseen``: no trial trains on them. Of each
    other class with 3 images or more, a fifth of its images (1 at least) are ``known``: validation images of a
    trained class. Drawn with ``seed``, so a resumed study validates on the same split.
    """
    names = folder.label_names
    members = {c: sorted(p for p, n in zip(folder.paths, names, strict=True) if n == c) for c in folder.class_names}
    usable = sorted(c for c, paths in members.items() if len(paths) >= 2)
    unseen_count = max(2, round(UNSEEN_SHARE * len(usable)))
    if len(usable) - unseen_count < 2:
        raise DatasetError(f"{folder.root}: tuning needs at least 4 classes with 2 images or more (2 to train on, "
                           f"2 to validate on as unseen classes); found {len(usable)}")
    rng = np.random.default_rng(seed)
    unseen = {str(c) for c in rng.choice(usable, size=unseen_count, replace=False)}
    split: dict[str, dict[str, list[str]]] = {"train": {}, "known": {}, "unseen": {}}
    for name in sorted(members):
        paths = members[name]
        if name in unseen:
            split["unseen"][name] = paths
            continue
        order = [paths[i] for i in rng.permutation(len(paths))]
        held = max(1, round(IMAGE_SHARE * len(paths))) if len(paths) >= 3 else 0
        split["known"][name], split["train"][name] = sorted(order[:held]), sorted(order[held:])
    split["known"] = {c: paths for c, paths in split["known"].items() if paths}
    if not split["known"]:
        raise DatasetError(f"{folder.root}: tuning needs trained classes with 3 images or more, to hold one out")
    return split


def write_split(split: dict[str, dict[str, list[str]]], root: Path) -> dict[str, str]:
    """The split as class folders ``root/<part>/<class>/`` (hard links where possible), written once."""
    if not root.is_dir():
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for part, classes in split.items():
            for name, paths in classes.items():
                for path in paths:
                    copy_linked(path, partial / part / name / Path(path).name)
        partial.rename(root)
    return {part: str(root / part) for part in split}


def study_storage() -> str:
    """Where studies are stored: ``$SIAMESE_TUNING_STORAGE``, else ``optuna.db`` beside a SQLite tracking store
    (or in the project: Optuna's tables cannot share MLflow's database, both keep an ``alembic_version``)."""
    if os.environ.get("SIAMESE_TUNING_STORAGE"):
        return os.environ["SIAMESE_TUNING_STORAGE"]
    uri = tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else project_root()
    return f"sqlite:///{folder / 'optuna.db'}"


def study_name(train_dir: Path, pins: dict[str, Any], presets: tuple[str, ...], seed: int) -> str:
    """The study of this folder, pins, compared presets and seed: the same command resumes it."""
    key = json.dumps([STUDY_SCHEMA, str(train_dir.resolve()), pins, presets, seed], sort_keys=True, default=str)
    return f"tune-{train_dir.resolve().name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def objective(fewshot: float, top1: float) -> float:
    """The study's objective (:data:`OBJECTIVE`)."""
    return FEWSHOT_WEIGHT * fewshot + (1 - FEWSHOT_WEIGHT) * top1


@dataclass
class Score:
    """A trial's validation figures with their 95 % half-widths."""

    fewshot: float
    fewshot_ci: float
    top1: float
    top1_ci: float

    @property
    def value(self) -> float:
        return objective(self.fewshot, self.top1)

    @property
    def ci(self) -> float:
        """The objective's half-width, its two parts taken as independent."""
        return math.hypot(FEWSHOT_WEIGHT * self.fewshot_ci, (1 - FEWSHOT_WEIGHT) * self.top1_ci)


def score(embeddings: dict[str, np.ndarray], labels: dict[str, np.ndarray],
          classify: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], seed: int) -> Score:
    """The validation figures from the embeddings of the split's parts: 1-shot episodes on the unseen classes,
    and the known images' top-1 among the trained images, both classified by ``classify`` (enrolment's path)."""
    n_way = min(FEWSHOT_WAY, len(np.unique(labels["unseen"])))
    shots = few_shot_accuracy(embeddings["unseen"], labels["unseen"], n_way, 1, EPISODES, seed=seed, classify=classify)
    # The episodes draw again and again on the validation classes' few images, so their spread understates the
    # uncertainty: the interval is at least that of a proportion over the distinct images.
    fewshot_ci = max(shots["ci95"], proportion_half_width(shots["mean"], len(labels["unseen"])))
    hits = classify(embeddings["train"], labels["train"], embeddings["known"]) == labels["known"]
    top1 = float(hits.mean())
    return Score(shots["mean"], fewshot_ci, top1, proportion_half_width(top1, len(hits)))


def pruned(earlier: list[dict[int, float]], values: dict[int, float]) -> bool:
    """Whether Optuna's median pruner stops a trial with these per-epoch ``values``, judged against the
    per-epoch values of the completed trials of earlier rounds (never those running beside it)."""
    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    study.add_trials([optuna.trial.create_trial(value=v[max(v)], intermediate_values=v) for v in earlier if v])
    now = datetime.now(UTC)
    trial = optuna.trial.FrozenTrial(
        number=len(earlier), state=optuna.trial.TrialState.RUNNING, value=None, datetime_start=now,
        datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
        intermediate_values=values, trial_id=len(earlier))
    return optuna.pruners.MedianPruner(**PRUNER).prune(study, trial)


@dataclass
class TrialSpec:
    """What a process needs to run one trial (picklable: it travels to Dask workers)."""

    number: int
    point: dict[str, Any]
    preset: str | None
    config: dict[str, Any]  # the library config
    split: dict[str, str]
    earlier: list[dict[int, float]]
    deadline: float  # time.time() past which the trial stops
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    progress: bool = True


@dataclass
class TrialOutcome:
    """A trial's end: COMPLETE with its score, PRUNED (``reason``: the pruner, or the budget), or FAIL when the
    budget ended before it started or this machine cannot train its settings."""

    number: int
    state: str
    values: dict[int, float]
    seconds: float
    run_id: str
    score: Score | None = None
    reason: str = ""


def _recognizer(network, embedded: dict[str, np.ndarray], labels: dict[str, np.ndarray], config):
    """A recogniser whose gallery is the split's training images, searched with ``config``."""
    from siamese_core.gallery import Gallery  # with the recogniser: they load TensorFlow
    from siamese_core.recognizer import SiameseRecognizer

    classes, rows = np.unique(labels["train"], return_inverse=True)
    gallery = Gallery(embedded["train"], rows, [str(c) for c in classes], [""] * len(rows))
    return SiameseRecognizer(network, gallery, config)


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Train one trial on the split's training classes, scoring the validation objective after every epoch
    (logged to the trial's nested MLflow run, and its pruning signal), then score the trained network as the
    product searches (the trial's test-time views and matching)."""
    start = time.time()
    if start >= spec.deadline:  # asked in a round that the budget ended before it started
        return TrialOutcome(spec.number, "FAIL", {}, 0.0, "", reason="not started: the time budget had run out")
    config = Config.model_validate(spec.config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the pruning check makes a study of its own every epoch
    mlflow = MlflowClient(spec.tracking_uri)
    run = mlflow.create_run(spec.experiment_id, run_name=f"trial {spec.number}", tags={
        "mlflow.parentRunId": spec.parent_run_id, "optuna.trial": str(spec.number), "preset": spec.preset or "",
        "state": "RUNNING", "process": f"{socket.gethostname()} pid {os.getpid()}"})
    run_id = run.info.run_id
    try:
        with ending(mlflow, run_id):  # the trial's run ends KILLED on Ctrl-C, FAILED on an error, from its first moment
            try:
                figures, values, reason = _train_and_score(spec, config, mlflow, run_id)
            except BaseException as exc:
                mlflow.log_batch(run_id, tags=[RunTag("state", "FAIL"), RunTag("reason", str(exc)[:500])])
                raise
            finally:
                _release_models()
            state = "PRUNED" if figures is None else "COMPLETE"
            if figures is not None:
                mlflow.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in {
                    "objective": figures.value, "objective_ci95": figures.ci, "fewshot_1shot": figures.fewshot,
                    "fewshot_1shot_ci95": figures.fewshot_ci, "top1": figures.top1,
                    "top1_ci95": figures.top1_ci}.items()])
            mlflow.log_batch(run_id, tags=[RunTag("state", state), RunTag("reason", reason)])
    except ConfigError as exc:  # settings of the search this machine cannot train (memory): this trial fails alone
        log.warning("trial %d failed: %s", spec.number, exc)
        return TrialOutcome(spec.number, "FAIL", {}, time.time() - start, run_id, reason=str(exc))
    return TrialOutcome(spec.number, state, values, time.time() - start, run_id, figures, reason)


def _release_models() -> None:
    """Free what a trial's models hold in Keras' global state (its graph, layer names, Python references). It does
    not return TensorFlow's native memory, which grows trial after trial: the trial process is replaced for that
    (:data:`RECYCLE_GROWTH`)."""
    import keras  # loaded already: the trial trained with it

    keras.backend.clear_session(free_memory=True)


def _train_and_score(spec: TrialSpec, config: Config, mlflow: MlflowClient, run_id: str
                     ) -> tuple[Score | None, dict[int, float], str]:
    """Train the trial, logging each epoch's validation objective to its run and stopping where the pruner or the
    budget says; returns its score as the product searches (None when stopped early), the per-epoch values and
    why it stopped."""
    import_tensorflow_quietly()  # its C++ start-up lines hidden
    # TensorFlow and the library's training load here, in the process that trains (a Dask worker too), so
    # `siamese tune --help`, the flows module and the study's driver stay light
    import keras
    from tqdm import tqdm

    from siamese_core.embed import decode_all, embed_images, predict_array
    from siamese_core.model import build_embedding_model, split_frozen_trunk
    from siamese_core.seeding import seeded
    from siamese_core.train import train

    mlflow.log_batch(run_id, params=[Param(k, str(v)) for k, v in {**spec.point, "preset": spec.preset}.items()])
    folders = {part: scan_folder(path) for part, path in spec.split.items()}
    classes = sorted({c for f in folders.values() for c in f.class_names})
    labels = {part: np.array([classes.index(n) for n in f.label_names]) for part, f in folders.items()}
    images = {part: decode_all(f.paths, config.model.input_size) for part, f in folders.items()}
    if config.train.caches_frozen_trunk:  # training feeds the top features
        with seeded(config.train.seed):
            trunk, _ = split_frozen_trunk(build_embedding_model(config.model))
        if trunk is not None:
            images = {part: predict_array(trunk, x, config.evaluate.embed_batch_size) for part, x in images.items()}
    values: dict[int, float] = {}
    stopped = {"reason": ""}
    bar = tqdm(total=config.train.epochs, desc=f"trial {spec.number}", unit="epoch", disable=not spec.progress,
               leave=True)

    def epoch_end(epoch: int, logs: dict | None) -> None:
        raise_if_interrupted()
        top = callback.model.embedding  # the network training updates (after a cached frozen trunk)
        embedded = {part: predict_array(top, x, config.evaluate.embed_batch_size) for part, x in images.items()}
        one_view = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"test_time_views": 1})})
        figures = score(embedded, labels, _recognizer(top, embedded, labels, one_view).classify_among, config.train.seed)
        values[epoch] = figures.value
        mlflow.log_batch(run_id, metrics=[Metric(key, float(value), int(time.time() * 1000), epoch) for key, value in {
            "val_objective": figures.value, "val_fewshot_1shot": figures.fewshot, "val_top1": figures.top1,
            **{k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}}.items()])
        bar.update(1)
        bar.set_postfix(objective=f"{figures.value:.3f}")
        if epoch + 1 < config.train.epochs and pruned(spec.earlier, values):
            stopped["reason"] = f"pruned at epoch {epoch + 1}: under the median of earlier trials"
        elif epoch + 1 < config.train.epochs and time.time() > spec.deadline:
            stopped["reason"] = f"stopped at epoch {epoch + 1}: the time budget ran out"
        if stopped["reason"]:
            callback.model.stop_training = True

    callback = keras.callbacks.LambdaCallback(on_epoch_end=epoch_end)
    try:
        result = train(config, spec.split["train"], callbacks=[callback], verbose=0)
    finally:
        bar.close()
    if stopped["reason"]:
        return None, values, stopped["reason"]
    e = config.evaluate  # as the product embeds and searches: the trial's views and matching
    embedded = {part: embed_images(result.embedding, f.paths, e.embed_batch_size, views=e.test_time_views,
                                   shift=e.test_time_shift) for part, f in folders.items()}
    recognizer = _recognizer(result.embedding, embedded, labels, config)
    return score(embedded, labels, recognizer.classify_among, config.train.seed), values, ""


def base_params(path: str | os.PathLike | None) -> PipelineParams:
    """The params a study starts from: ``path``, else params.yaml (``$SIAMESE_PARAMS``) where there is one, else
    the values params.yaml ships with."""
    if path or os.environ.get("SIAMESE_PARAMS") or DEFAULT_PARAMS.is_file():
        return load_params(path)
    return validate_config(PipelineParams, over_params(PipelineParams().model_dump(), shipped_keys(), {})[0],
                           "shipped params")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's complete and pruned trials: what ``--trials`` counts."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def choose_winner(complete: list[optuna.trial.FrozenTrial]) -> tuple[optuna.trial.FrozenTrial, str]:
    """The trial whose settings are written, and why when it is not the top scorer. The top-scoring trial wins only
    if it beats the best compared preset beyond both 95 % intervals; otherwise that preset is kept: among many noisy
    trials the top score is biased upwards, most of all on small validation splits."""
    top = max(complete, key=_value)
    presets = [t for t in complete if t.user_attrs.get("preset")]
    if top.user_attrs.get("preset") or not presets:
        return top, ""
    preset = max(presets, key=_value)
    if _value(top) - _half_width(top) > _value(preset) + _half_width(preset):
        return top, ""
    return preset, (f"trial {top.number} scored highest ({_value(top):.3f} ± {_half_width(top):.3f}) but does not beat "
                    f"preset {preset.user_attrs['preset']} ({_value(preset):.3f} ± {_half_width(preset):.3f}) beyond "
                    "their 95 % intervals, so the preset's settings are written")


def _value(trial: optuna.trial.FrozenTrial) -> float:
    """A complete trial's objective."""
    assert trial.value is not None
    return trial.value


def _half_width(trial: optuna.trial.FrozenTrial) -> float:
    return trial.user_attrs.get("objective_ci95") or 0.0


def _enqueue_presets(study: optuna.Study, presets: tuple[str, ...], base: PipelineParams,
                     space: tuple[Dimension, ...]) -> list[str]:
    """Queue the compared presets not yet tried (again after a failure); returns those outside the space."""
    waiting = (optuna.trial.TrialState.WAITING,)
    tried = {t.user_attrs.get("preset") for t in finished(study) + study.get_trials(deepcopy=False, states=waiting)}
    outside = []
    for name in presets:
        point = preset_point(name, base, space)
        if point is None:
            outside.append(name)
        elif name not in tried:
            study.enqueue_trial(point, user_attrs={"preset": name})
    return outside


def _parent_run(study: optuna.Study, experiment_id: str, name: str) -> str:
    """The study's MLflow run: the one an earlier session opened (reopened), else a new one."""
    mlflow = client()
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        mlflow.update_run(run_id, status="RUNNING")
        return run_id
    run_id = mlflow.create_run(experiment_id, run_name=f"tuning {name}", tags={"study": name}).info.run_id
    study.set_user_attr("mlflow_run_id", run_id)
    return run_id


@dataclass
class TuningResult:
    """A study's outcome: the trials, the winner, the compared presets, the time, the params file written."""

    study: str
    storage: str
    run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    presets: dict[str, dict[str, Any] | None]
    seconds: float
    out: str
    command: str
    split: dict[str, int]
    final: dict[str, Any] = field(default_factory=dict)
    kept_preset: str = ""  # why the winner is a preset and not the top-scoring trial (:func:`choose_winner`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {"trial": trial.number, "preset": attrs.get("preset") or "", "state": trial.state.name,
            "objective": trial.value, "objective_ci95": attrs.get("objective_ci95"),
            "fewshot_1shot": attrs.get("fewshot_1shot"), "top1": attrs.get("top1"),
            "epochs_run": len(trial.intermediate_values), "seconds": attrs.get("seconds"), "reason": attrs.get("reason", ""),
            **{f"param.{k}": v for k, v in trial.params.items()}}


def _table_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _run_round(specs: list[TrialSpec], trials: TrialProcess, dask_client) -> Iterator[TrialOutcome]:
    """The round's trials, each yielded as it ends (so an interrupt keeps those that ended): one after another in
    the trial process, or side by side on Dask (those still running are cancelled when the round stops early)."""
    if dask_client is None:
        yield from (_in_trial_process(spec, trials) for spec in specs)
        return
    from distributed import as_completed  # Dask loads only when trials run on a cluster

    futures = [dask_client.submit(run_trial, spec, pure=False) for spec in specs]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        dask_client.cancel(futures)


def _in_trial_process(spec: TrialSpec, trials: TrialProcess) -> TrialOutcome:
    """Run the trial in the trial process; one whose process dies (killed when memory ran out) fails alone, its
    run ended FAILED with the reason."""
    start = time.time()
    try:
        return trials.call(run_trial, spec)
    except TrialProcessDied as died:
        log.warning("trial %d failed: %s", spec.number, died)
        mlflow = MlflowClient(spec.tracking_uri)
        ended = _end_open_trials(mlflow, spec.experiment_id, spec.parent_run_id, died, trial=spec.number)
        return TrialOutcome(spec.number, "FAIL", {}, time.time() - start, ended[0] if ended else "", reason=str(died))


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """Record a trial's outcome in the study: its per-epoch values, time, reason, MLflow run and figures."""
    for step, value in outcome.values.items():
        trial.report(value, step)
    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    trial.set_user_attr("reason", outcome.reason)
    trial.set_user_attr("mlflow_run_id", outcome.run_id)
    if outcome.score is None:
        failed = outcome.state == "FAIL"
        study.tell(trial, state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED)
        return
    figures = outcome.score
    for key, value in {"fewshot_1shot": figures.fewshot, "fewshot_1shot_ci95": figures.fewshot_ci,
                       "top1": figures.top1, "top1_ci95": figures.top1_ci, "objective_ci95": figures.ci}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, figures.value)


def _end_open_trials(mlflow: MlflowClient, experiment_id: str, parent_run_id: str, error: BaseException,
                     trial: int | None = None) -> list[str]:
    """End the study's trial runs still RUNNING (or trial ``trial``'s) as ``error`` ended them, returning their
    ids: a Ctrl-C that lands between a trial's run being created and its own handler taking over, or a trial
    process that died, leaves one open otherwise."""
    which = f" and tags.`optuna.trial` = '{trial}'" if trial is not None else ""
    ended = []
    for run in mlflow.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                  f"attributes.status = 'RUNNING'{which}"):
        mlflow.log_batch(run.info.run_id, tags=[RunTag("state", "FAIL"), RunTag("reason", str(error)[:500])])
        end_run(mlflow, run.info.run_id, error)
        ended.append(run.info.run_id)
    return ended


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a study; the message says what was kept and how to resume, in one line."""


def tune(train_dir: str | os.PathLike, out: str | os.PathLike, minutes: float, trials: int | None = None,
         test_dir: str | os.PathLike | None = None, heldout_dir: str | os.PathLike | None = None,
         params_path: str | os.PathLike | None = None, pins: dict[str, Any] | None = None,
         dask_address: str | None = None, presets: tuple[str, ...] = COMPARED_PRESETS, parallel: int = 2,
         workdir: str | os.PathLike = ".siamese-tuning", progress: bool = True) -> TuningResult:
    """Search :data:`SEARCH_SPACE` (less the ``pins``, ``--set`` keys that stay as given) for ``minutes`` or
    until the study holds ``trials`` finished trials, write the winner as the params file ``out``, and score
    it on ``test_dir`` and ``heldout_dir`` when given (after training it on the whole ``train_dir``).

    Trials run in rounds of ``parallel``: on the Dask scheduler at ``dask_address`` side by side, else one after
    another, with the same trials either way. Each trial is recorded as it ends, so Ctrl-C keeps every finished
    trial in the storage: the study's MLflow run ends KILLED and :class:`StudyInterrupted` says in one line what was
    kept; the same command resumes the study.
    """
    started = time.time()
    deadline = started + minutes * 60
    train_path, out_path = Path(train_dir), Path(out)
    base = base_params(params_path)
    pins = dotted_pins(pins or {}, base)
    apply_overrides(base, pins)  # a bad --set fails now, in one line
    space = free_space(pins)
    seed = base.train.seed
    folder = scan_folder(train_path)
    name = study_name(train_path, pins, presets, seed)
    split_paths = write_split(split_folder(folder, seed), Path(workdir).resolve() / name / "split")
    split_sizes = {part: len(scan_folder(path)) for part, path in split_paths.items()}
    storage = study_storage()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=seed),
                                direction="maximize", load_if_exists=True)
    experiment_id = ensure_experiment(base.register.experiment)
    run_id = _parent_run(study, experiment_id, name)
    mlflow = client()
    mlflow.log_text(run_id, space_table(space), "search_space.md")
    mlflow.log_dict(run_id, {"objective": OBJECTIVE, "pins": pins, "presets": list(presets), "storage": storage,
                             "split": split_sizes}, "study.json")
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # left running by a session that was killed
    outside = _enqueue_presets(study, presets, base, space)
    if outside:
        log.warning("not compared: preset(s) %s set values outside the search space", ", ".join(outside))
    target = trials or math.inf
    dask_client = None
    if dask_address:
        from distributed import Client  # Dask's client loads only when trials run on a cluster

        dask_client = Client(dask_address, timeout=base.compute.dask_connect_timeout)
    asked: list[optuna.Trial] = []
    with noting_interrupts():
        try:
            with TrialProcess(RECYCLE_GROWTH) as trials_process:  # serial trials run there, Dask's on its workers
                while len(finished(study)) < target and time.time() < deadline:
                    earlier = [dict(t.intermediate_values) for t in study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
                    asked = [study.ask() for _ in range(int(min(parallel, target - len(finished(study)))))]
                    specs = []
                    for trial in asked:
                        point = {d.name: d.suggest(trial) for d in space}
                        preset = trial.user_attrs.get("preset")
                        config = trial_params(base, point, pins, preset).core().model_dump(mode="json")
                        trial.set_user_attr("epochs", config["train"]["epochs"])
                        specs.append(TrialSpec(trial.number, point, preset, config, split_paths, earlier, deadline,
                                               tracking_uri(), experiment_id, run_id, progress))
                    by_number = {trial.number: trial for trial in asked}
                    for outcome in _run_round(specs, trials_process, dask_client):
                        _tell(study, by_number[outcome.number], outcome)
                        raise_if_interrupted()
                    asked = []
            return _conclude(study, run_id, base, pins, train_path, out_path, test_dir, heldout_dir, presets, started,
                             minutes, storage, split_sizes)
        except (KeyboardInterrupt, Exception) as exc:
            for trial in asked:  # those of the round that had not ended
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            _end_open_trials(mlflow, experiment_id, run_id, exc)
            end_run(mlflow, run_id, exc)
            if not isinstance(exc, KeyboardInterrupt):
                raise
            raise StudyInterrupted(f"interrupted: {len(finished(study))} finished trial(s) kept in {storage} (study "
                                   f"{name}); the same command resumes the study") from None
        finally:
            if dask_client is not None:
                dask_client.close()


def _conclude(study: optuna.Study, run_id: str, base: PipelineParams, pins: dict[str, Any], train_path: Path,
              out: Path, test_dir, heldout_dir, presets: tuple[str, ...], started: float, minutes: float,
              storage: str, split_sizes: dict[str, int]) -> TuningResult:
    """Write the winner's params file, score it on the test and held-out folders, log the study's summary."""
    mlflow = client()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"no trial finished within {minutes:g} minute(s){_needed(finished(study))}: give "
                          "--minutes more, or pin a smaller network or fewer epochs with --set")
    best, kept_preset = choose_winner(complete)
    winner = trial_params(base, best.params, pins, best.user_attrs.get("preset"))
    data = {**winner.data.model_dump(), "train_dir": str(train_path),
            **({"test_dir": str(test_dir)} if test_dir else {}), **({"heldout_dir": str(heldout_dir)} if heldout_dir else {})}
    written = winner.model_copy(update={"data": winner.data.model_validate(data)})
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    temporary.write_text(f"# siamese tune: trial {best.number} of study {study.study_name} ({OBJECTIVE}: "
                         f"{best.value:.4f})\n" + yaml.safe_dump(written.model_dump(mode="json"), sort_keys=False),
                         encoding="utf-8")
    temporary.replace(out)
    rows = [_row(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    by_preset = {t.user_attrs.get("preset"): _row(t) for t in finished(study) if t.user_attrs.get("preset")}
    test = f" --test {test_dir}" if test_dir else ""
    result = TuningResult(
        study.study_name, storage, run_id, rows, _row(best), {name: by_preset.get(name) for name in presets},
        round(time.time() - started, 1), str(out), f"siamese train --train {train_path}{test} --params {out} "
        "--out model", split_sizes, kept_preset=kept_preset)
    if test_dir or heldout_dir:
        result.final = final_scores(written, train_path, test_dir, heldout_dir)
    mlflow.log_text(run_id, _table_csv(rows), "trials.csv")
    mlflow.log_text(run_id, summary_text(result), "summary.txt")
    mlflow.log_artifact(run_id, str(out))
    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), len(rows)) for k, v in {
        "best_objective": _value(best), "trials_finished": len(finished(study)), "trials_complete": len(complete),
        **{f"final.{k}": v for k, v in result.final.items() if isinstance(v, float)}}.items()],
        tags=[RunTag("best_trial", str(best.number)), RunTag("best_run_id", best.user_attrs.get("mlflow_run_id", "")),
              *(RunTag(f"best.{k}", str(v)) for k, v in best.params.items())])
    end_run(mlflow, run_id)
    return result


def _needed(stopped: list[optuna.trial.FrozenTrial]) -> str:
    """What the longest of the trials the budget stopped ran, and what a whole trial would need at that pace."""
    ran = [t for t in stopped if t.intermediate_values and t.user_attrs.get("seconds")]
    if not ran:
        return ""
    t = max(ran, key=lambda t: t.user_attrs["seconds"])
    epochs, seconds, done = t.user_attrs.get("epochs"), t.user_attrs["seconds"], len(t.intermediate_values)
    pace = f" of {epochs}: a whole trial needs about {seconds * epochs / done / 60:.1f} min" if epochs else ""
    return f" (trial {t.number} ran {done} epoch(s) in {seconds:.0f} s{pace})"


def final_scores(params: PipelineParams, train_dir: Path, test_dir, heldout_dir) -> dict[str, Any]:
    """The winner trained on the whole training folder, scored on ``test_dir`` (top-1) and ``heldout_dir`` (1-shot,
    enrolled as enrolment does): the first time the study sees those folders."""
    import_tensorflow_quietly()  # its C++ start-up lines hidden
    # TensorFlow loads in the study's process only for this last training
    from siamese_core.evaluation import evaluate
    from siamese_core.recognizer import SiameseRecognizer, build_gallery
    from siamese_core.train import train

    config = params.core()
    start = time.perf_counter()
    result = train(config, train_dir, verbose=0)
    scores: dict[str, Any] = {"train_seconds": round(time.perf_counter() - start, 1)}
    recognizer = SiameseRecognizer(result.embedding, build_gallery(result.embedding, result.train_folder,
                                                                   config.evaluate), config)
    if test_dir:
        report = evaluate(recognizer, test_dir, top_k=config.evaluate.top_k, seed=config.train.seed)
        scores["test_top1"] = float(report.top1)
        if report.top1_ci95 is not None:
            scores["test_top1_interval"] = [report.top1_ci95.low, report.top1_ci95.high]
    if heldout_dir:
        folder = scan_folder(heldout_dir)
        n_way = min(FEWSHOT_WAY, len(folder.class_names))
        shots = few_shot_accuracy(recognizer.embed(folder.paths), folder.labels, n_way, 1, EPISODES,
                                  seed=config.train.seed, classify=recognizer.classify_among)
        scores.update({"heldout_1shot": shots["mean"], "heldout_1shot_ci95": shots["ci95"], "heldout_way": n_way})
    return scores


def _figure(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run (the budget ended first, or it failed)"
    if row["state"] != "COMPLETE":
        return f"{row['state'].lower()}: {row['reason'] or 'stopped'}"
    return (f"{row['objective']:.3f} ± {row['objective_ci95']:.3f} (1-shot {row['fewshot_1shot']:.3f}, "
            f"top-1 {row['top1']:.3f})")


def summary_text(result: TuningResult) -> str:
    """What the user acts on: the winner against each preset on the same split, the time, the command."""
    states = [row["state"] for row in result.trials]
    sizes = result.split
    failed = f", {states.count('FAIL')} interrupted or failed" if "FAIL" in states else ""
    lines = [f"study {result.study}: {len(states)} trials ({states.count('COMPLETE')} complete, "
             f"{states.count('PRUNED')} pruned{failed}) in {result.seconds / 60:.1f} min; storage {result.storage}",
             f"objective: {OBJECTIVE}; validated on {sizes['unseen']} images of unseen classes and {sizes['known']} "
             f"held-out images, trained on {sizes['train']}",
             f"  winner, trial {result.best['trial']}{' (preset ' + result.best['preset'] + ')' if result.best['preset'] else ''}: "
             f"{_figure(result.best)}"] + ([f"  ({result.kept_preset})"] if result.kept_preset else [])
    lines += [f"  preset {name}: {_figure(row)}" for name, row in result.presets.items()]
    final = result.final
    if final:
        bounds = final.get("test_top1_interval")
        interval = f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""
        parts = ([f"test top-1 {final['test_top1']:.3f}{interval}"] if "test_top1" in final else []) + (
            [f"held-out classes {final['heldout_way']}-way 1-shot {final['heldout_1shot']:.3f} ± "
             f"{final['heldout_1shot_ci95']:.3f}"] if "heldout_1shot" in final else [])
        lines.append(f"the winner trained on the whole training folder in {final['train_seconds'] / 60:.1f} min: "
                     + ", ".join(parts))
    lines.append(f"wrote {result.out}; train with it: {result.command}")
    return "\n".join(lines)
