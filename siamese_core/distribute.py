"""Training on several devices with ``tf.distribute`` (``train.distribute``).

- ``none``: the default strategy, one device.
- ``mirrored``: ``MirroredStrategy`` over this machine's GPUs (or logical CPU devices); each
  global batch is split across them.

The custom train steps see the whole global batch for mining (embeddings and labels are
all-gathered across replicas), divide the loss by the replica count (Keras sums the gradients
of the replicas), and use synchronized batch normalisation, so one distributed step equals
one single-device step.
"""

from __future__ import annotations

import tensorflow as tf

from .errors import ConfigError


def strategy_for(distribute: str) -> tf.distribute.Strategy:
    """The strategy of ``train.distribute``; create it before any other TensorFlow work in the process."""
    if distribute == "none":
        return tf.distribute.get_strategy()
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise ConfigError(f"train.distribute: unknown '{distribute}', expected none or mirrored")


def replicas() -> int:
    """How many replicas compute each step (1 outside a distribution strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def gather(*tensors):
    """Each tensor concatenated over all replicas along axis 0, in replica order (as is, with one replica)."""
    if replicas() == 1:
        return tensors
    context = tf.distribute.get_replica_context()
    return tuple(context.all_gather(t, axis=0) for t in tensors)
