"""Training on several devices or machines with ``tf.distribute`` (``train.distribute``).

- ``none``: the default strategy, one device.
- ``mirrored``: ``MirroredStrategy`` over this machine's GPUs (or logical CPU devices); each
  global batch is split across them.
- ``multi_worker``: ``MultiWorkerMirroredStrategy``; every process runs the same command with
  its ``TF_CONFIG``, takes its slice of each global batch, and only the chief writes.

The custom train steps see the whole global batch for mining (embeddings and labels are
gathered across replicas), divide the loss by the replica count (Keras sums the gradients
of the replicas), and use synchronized batch normalisation, so one distributed step equals
one single-device step.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from .errors import ConfigError


def strategy_for(distribute: str) -> tf.distribute.Strategy:
    """The strategy of ``train.distribute``; create it before any other TensorFlow work in the process."""
    if distribute == "none":
        return tf.distribute.get_strategy()
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    if distribute == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError("train.distribute=multi_worker needs TF_CONFIG: the cluster's workers and this "
                              "process's task (see docs/how-to/scaling.md)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"train.distribute: unknown '{distribute}', expected none, mirrored or multi_worker")


def replicas() -> int:
    """How many replicas compute each step (1 outside a distribution strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def gather(*tensors):
    """Each tensor concatenated over all replicas along axis 0, in replica order (as is, with one replica).

    Built from one all-reduce (each replica's rows placed at its offset in zeros, then summed),
    which every strategy supports; it is differentiable, and each replica's gradient comes back
    summed over replicas, which the loss divided by the replica count makes right.
    """
    count = replicas()
    if count == 1:
        return tensors
    context = tf.distribute.get_replica_context()
    replica = context.replica_id_in_sync_group
    size = tf.shape(tensors[0])[0]
    sizes = tf.cast(context.all_reduce("sum", tf.one_hot(replica, count) * tf.cast(size, tf.float32)), tf.int32)
    offset, total = tf.reduce_sum(sizes[:replica]), tf.reduce_sum(sizes)
    gathered = []
    for tensor in tensors:
        rows = [[offset, total - offset - size]] + [[0, 0]] * (len(tensor.shape) - 1)
        gathered.append(tf.cast(context.all_reduce("sum", tf.pad(tf.cast(tensor, tf.float32), rows)), tensor.dtype))
    return tuple(gathered)


def step_logs(logs: dict) -> dict:
    """A train or test step's logs, shaped so that Keras can average them across workers (it reduces
    over axis 0 under MultiWorkerMirroredStrategy, which a scalar has not)."""
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {name: tf.reshape(value, (1,)) for name, value in logs.items()}


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def worker_slice() -> tuple[int, int]:
    """``(index, count)`` of this process among the cluster's workers (``(0, 1)`` without TF_CONFIG)."""
    config = _tf_config()
    cluster, task = config.get("cluster", {}), config.get("task", {})
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if workers <= 1 or not task:
        return 0, 1
    offset = len(cluster.get("chief", [])) if task.get("type") == "worker" else 0
    return offset + int(task.get("index", 0)), workers


def is_chief() -> bool:
    """Whether this process writes outputs: the only process, the ``chief`` task, or worker 0 without a chief."""
    return worker_slice()[0] == 0
