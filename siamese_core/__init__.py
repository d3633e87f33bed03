"""siamese_core: a Siamese triplet network that recognises images by their nearest gallery class.

Heavy modules (TensorFlow) load on first use, so ``import siamese_core`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "apply_overrides": "config",
    "load_config": "config",
    "scan_folder": "data",
    "decode_image": "data",
    "Gallery": "gallery",
    "Match": "gallery",
    "SiameseRecognizer": "recognizer",
    "build_gallery": "recognizer",
    "save_trained_bundle": "recognizer",
    "train": "train",
    "generate_triplets": "triplets",
    "generate_model": "api",
    "test_prediction": "api",
    "evaluate": "evaluation",
    "assess": "evaluation",
    "validate_dataset": "validation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'siamese_core' has no attribute '{name}'")
