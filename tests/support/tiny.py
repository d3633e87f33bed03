"""Every tiny setting the tests use, in one place, all built on one network: a small CNN on 32 px images,
no pretrained weights. Tests add what they need on top (a larger head, online mining, more epochs), in the open.
"""

from __future__ import annotations

import json

from siamese_core.config import Config, apply_overrides

TINY_NETWORK = {"weights": None, "backbone": "small_cnn", "input_size": 32, "head_units": [16], "embedding_dim": 8}


def tiny_config(**overrides) -> Config:
    """The library config of the tiny network, with ``overrides`` (bare or dotted keys)."""
    return apply_overrides(Config(), {**TINY_NETWORK, **overrides})


def tiny_set_options(**overrides) -> list[str]:
    """The same settings as ``siamese ... --set key=value`` options (values as JSON, which YAML reads)."""
    return [part for key, value in {**TINY_NETWORK, **overrides}.items()
            for part in ("--set", f"{key}={json.dumps(value)}")]


# A training the model tests run in seconds: the tiny network for one epoch.
TINY_MODEL = {
    **TINY_NETWORK,
    "learning_rate": 1e-3,
    "epochs": 1,
    "train.batch_size": 16,
    "max_pairs_per_class": 10,
}

# The smallest run that still goes through every stage: 1 epoch on the demo data cut down by TINY_DATA.
TINY_DATA = {"classes": 6, "per_class": 5}  # 6 known classes (4 train, 1 test image) and 6 held-out (5 images)
TINY_PARAMS = {
    **{f"model.{key}": value for key, value in TINY_NETWORK.items()},
    "train.classes_per_batch": 6,
    "train.images_per_class": 4,
    "evaluate.fewshot_episodes": 20,
    "triplets.max_pairs_per_class": 10,
    "train.epochs": 1,
    "train.batch_size": 16,
    "evaluate.top_k": 3,
    # one epoch of the tiny network need not beat its baselines: these runs test the pipeline's mechanics, and
    # the tests of the baseline gate set the margin back to 0
    "evaluate.baseline_margin": -1.0,
}
