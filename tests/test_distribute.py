"""Training with tf.distribute: one mirrored step over two logical CPU devices equals the single-device step.

It runs in a fresh process: logical devices are set before TensorFlow starts.
"""

import json
import os
import subprocess
import sys
import textwrap

from images import make_digits_dataset
from tiny import TINY_NETWORK

ONE_STEP = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from siamese_core.config import Config, apply_overrides
    from siamese_core.model import build_embedding_model
    from siamese_core.train import train

    overrides, train_dir = json.loads(sys.argv[1]), sys.argv[2]
    weights = {}
    for distribute in ("none", "mirrored"):
        config = apply_overrides(Config(), {**overrides, "train.distribute": distribute})
        weights[distribute] = train(config, train_dir, verbose=0).embedding.get_weights()
    keras.utils.set_random_seed(config.train.seed)  # the weights both runs started from
    initial = build_embedding_model(config.model).get_weights()
    print(json.dumps({"replicas": len(tf.config.list_logical_devices("CPU")),
                      "max_difference": max(float(np.abs(a - b).max()) for a, b in zip(*weights.values())),
                      "max_update": max(float(np.abs(a - b).max()) for a, b in zip(weights["none"], initial))}))
""")


def test_one_mirrored_step_equals_the_single_device_step(tmp_path):
    train_dir, _ = make_digits_dataset(tmp_path / "digits", classes=4, train_per_class=4, test_per_class=0)
    overrides = {**TINY_NETWORK, "head_units": [16], "mining": "batch_all", "classes_per_batch": 4,
                 "images_per_class": 4, "steps_per_epoch": 1, "epochs": 1, "optimizer": "sgd", "learning_rate": 0.5,
                 "train.augment.rotation": 0, "train.augment.shift": 0, "train.augment.zoom": 0,
                 "train.augment.shear": 0, "train.augment.rotations_as_classes": False}
    result = subprocess.run([sys.executable, "-c", ONE_STEP, json.dumps(overrides), str(train_dir)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["replicas"] == 2
    # the step moved some weight by max_update; the two steps agree to a thousandth of that (float32 round-off)
    assert figures["max_update"] > 0.1 and figures["max_difference"] < 1e-3 * figures["max_update"]
