"""The one tiny network the tests train: a small CNN on 32 px images, no pretrained weights.

Tests add what they need on top (a larger head, online mining, more epochs), in the open.
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
