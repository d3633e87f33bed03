"""Batch normalisation statistics that match training ("precise BN", Wu & Johnson, Rethinking 'Batch'
in BatchNorm, 2021).

In training, a BatchNormalization layer normalises with the statistics of the current batch; at
inference, with its moving averages, which Keras updates with momentum 0.99 from an initial mean
of 0 and variance of 1. After a few hundred steps the averages still carry a large share of those
initial values and lag behind weights that keep changing, so the network answers differently at
inference than it did in training: on small data sets every inference distance shrank a hundredfold.
:func:`recalibrate_batch_norm` replaces the averages by the mean of the batch statistics of the
current weights, measured in training mode on training batches.
"""

from __future__ import annotations

import keras
import numpy as np


def trainable_batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers of ``model`` (nested models included) that training updates.

    Frozen ones (``trainable=False``) run in inference mode in training too, so they already agree.
    """
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(trainable_batch_norms(layer) if layer.trainable else [])
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found.append(layer)
    return found


def recalibrate_batch_norm(model: keras.Model, inputs: np.ndarray, batch_size: int, max_images: int,
                           seed: int = 0) -> int:
    """Set every trainable BatchNormalization layer's moving mean and variance to the average of its
    batch statistics over batches of ``batch_size`` rows drawn from ``inputs`` (at most ``max_images``,
    a seeded sample); the layers' weights are untouched. Returns the number of batches used (0 when
    the model has no such layer)."""
    layers = trainable_batch_norms(model)
    if not layers or max_images <= 0 or not len(inputs):
        return 0
    rows = np.random.default_rng(seed).permutation(len(inputs))[:max_images]
    batch_size = max(2, min(batch_size, len(rows)))
    starts = range(0, len(rows) - batch_size + 1, batch_size)  # whole batches only: a short one skews the variance
    momenta = [layer.momentum for layer in layers]
    try:
        for i, start in enumerate(starts):
            for layer in layers:  # a running mean: batch i gets weight 1 / (i + 1)
                layer.momentum = i / (i + 1)
            model(inputs[np.sort(rows[start:start + batch_size])], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(starts)
