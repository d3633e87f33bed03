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


class OutputError(RuntimeError):
    """An output that cannot be written (a read-only folder, a full disk), with the path and the cause."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded on this machine."""


USER_ERRORS = (
    ConfigError, DatasetError, ImageError, BundleError, OutputError, WeightsUnavailableError, FileNotFoundError,
)
