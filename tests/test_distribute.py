"""Training with tf.distribute: one mirrored step over two logical CPU devices equals the single-device
step, and a two-process multi-worker run on loopback trains and its chief writes a bundle that predicts.

Both run in fresh processes: logical devices and multi-worker collectives are set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from support.images import make_digits_dataset
from support.tiny import TINY_NETWORK, tiny_set_options

ONE_STEP = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from siamese_core.config import Config, apply_overrides
    from siamese_core.model import initial_embedding_model
    from siamese_core.train import train

    overrides, train_dir = json.loads(sys.argv[1]), sys.argv[2]
    weights = {}
    for distribute in ("none", "mirrored"):
        config = apply_overrides(Config(), {**overrides, "train.distribute": distribute})
        weights[distribute] = train(config, train_dir, verbose=0).embedding.get_weights()
    initial = initial_embedding_model(config).get_weights()  # the weights both runs started from
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


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow  # two training processes on loopback, about 27 s: with the slow tests, which CI runs
def test_a_two_process_multi_worker_run_trains_and_the_chief_writes_the_bundle(tmp_path):
    train_dir, test_dir = make_digits_dataset(tmp_path / "digits", classes=4, train_per_class=6, test_per_class=2)
    out = tmp_path / "bundle"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    command = [sys.executable, "-m", "pipelines.cli", "train", "--train", str(train_dir), "--test", str(test_dir),
               "--out", str(out), "--epochs", "2", *tiny_set_options(mining="batch_all", classes_per_batch=4,
                                                                     images_per_class=4, distribute="multi_worker")]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                     "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    chief = outputs[0][0].strip().splitlines()
    assert chief[-2].startswith(f"saved {out}") and "baselines on its own test split" in chief[-1]
    assert outputs[1][0].strip().splitlines()[-1] == f"worker 1 of 2: trained 2 epochs; the chief writes {out}"

    from siamese_core.recognizer import SiameseRecognizer

    recognizer = SiameseRecognizer.load(out)
    image = sorted(Path(train_dir, "digit 2").iterdir())[0]
    match = recognizer.predict_one(image)
    assert match.label == "digit 2" and match.distance < 1e-4
    history = recognizer.metadata["history"]["loss"]
    assert len(history) == 2 and np.isfinite(history).all()
