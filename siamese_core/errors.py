"""Errors a user can cause and fix; the CLI reports each in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


class DatasetError(ValueError):
    """A dataset folder that cannot be used, with the path and the problem."""


class ImageError(ValueError):
    """An image that cannot be decoded, with the path and the problem."""


class BundleError(ValueError):
    """A path that is not a usable model bundle."""

    @classmethod
    def not_a_folder(cls, path: object) -> BundleError:
        """The error for a bundle path that is no folder (checked before TensorFlow loads, and by the loader)."""
        return cls(f"{path}: no model bundle here (expected a folder written by 'siamese train')")


class OutputError(RuntimeError):
    """An output that cannot be written (a read-only folder, a full disk), with the path and the cause."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded on this machine."""


USER_ERRORS = (
    ConfigError, DatasetError, ImageError, BundleError, OutputError, WeightsUnavailableError, FileNotFoundError,
)
