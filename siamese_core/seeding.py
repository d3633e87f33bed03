"""Seeding that other threads cannot disturb.

Keras gives every initializer, dropout and augmentation layer made without a seed one drawn from
Python's global ``random`` module. Other threads draw from it too (a websocket keep-alive ping of
Prefect's event client takes 32 random bits), so two trainings with the same seed could start from
different weights when such a thread drew in between. :func:`seeded` gives the calling thread its own
generator for those draws.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import keras
from keras.src.random import seed_generator  # private: see tests/test_private_apis.py

_local = threading.local()


class _KerasSeedSource:
    """Stands in for the ``random`` module where Keras draws default seeds: the calling thread's own
    generator inside :func:`seeded`, Python's global one elsewhere."""

    def randint(self, low: int, high: int) -> int:
        generator = getattr(_local, "generator", None)
        return (generator or random).randint(low, high)


def _install() -> None:
    if not isinstance(seed_generator.python_random, _KerasSeedSource):  # its make_default_seed reads this name
        seed_generator.python_random = _KerasSeedSource()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy, TensorFlow and Keras (``keras.utils.set_random_seed``), and for the block
    draw the seeds Keras gives layers from a generator of this thread alone, seeded with ``seed``."""
    _install()
    keras.utils.set_random_seed(seed)
    outer = getattr(_local, "generator", None)
    _local.generator = random.Random(seed)
    try:
        yield
    finally:
        _local.generator = outer
