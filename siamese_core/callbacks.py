"""The callbacks of a training run: re-estimate batch normalisation statistics, keep the best weights,
checkpoint each epoch, measure few-shot accuracy on held-out classes, and stop an embedding that collapses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np

from .batchnorm import recalibrate_batch_norm
from .embed import predict_array
from .errors import ConfigError
from .io import atomic_dir
from .metrics import few_shot_accuracy

log = logging.getLogger(__name__)


class PreciseBatchNorm(keras.callbacks.Callback):
    """At the end of each epoch's last training step, before Keras validates, set the moving statistics
    of batch normalisation to those of the epoch's final weights on training images (see
    :mod:`siamese_core.batchnorm`), so validation, few-shot figures and the kept weights all use the
    statistics inference will use."""

    def __init__(self, embedding: keras.Model, inputs: np.ndarray, batch_size: int, steps_per_epoch: int,
                 max_images: int, seed: int = 0):
        super().__init__()
        self.embedding, self.inputs, self.batch_size = embedding, inputs, batch_size
        self.steps_per_epoch, self.max_images, self.seed = steps_per_epoch, max_images, seed

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.steps_per_epoch == 0:
            recalibrate_batch_norm(self.embedding, self.inputs, self.batch_size, self.max_images, self.seed)


class KeepBestWeights(keras.callbacks.Callback):
    """Remember the embedding weights of the epoch with the lowest monitored loss and restore them.

    With ``monitor=None`` the last epoch is kept: online mining losses average over the
    triplets that are still active, so they do not fall as the embedding improves.
    """

    def __init__(self, embedding: keras.Model, monitor: str | None = "val_loss"):
        super().__init__()
        self.embedding, self.monitor = embedding, monitor
        self.best, self.best_epoch = np.inf, 0
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            self.best_epoch = epoch + 1
            return
        logs = logs or {}
        value = logs.get(self.monitor, logs.get("loss"))
        if value is not None and value < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.embedding.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.embedding.set_weights(self.best_weights)

    @property
    def reason(self) -> str:
        """Why the kept epoch was kept, in words."""
        if self.monitor is None:
            return ("online mining keeps the last epoch: its loss averages only the triplets still active, "
                    "so losses of different epochs are not compared")
        return f"lowest {self.monitor} ({self.best:.4g}), measured with batch statistics re-estimated for inference"


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, save what ``--resume`` needs to carry on: the weights with the
    optimizer state, the history so far and the best epoch's weights (atomically, as .npz)."""

    STATE, WEIGHTS, BEST = "state.json", "weights.npz", "best.npz"

    def __init__(self, directory: Path, keep_best: KeepBestWeights, history: dict[str, list[float]],
                 fingerprint: dict[str, object] | None = None):
        super().__init__()
        self.directory, self.keep_best, self.history = Path(directory), keep_best, history
        self.fingerprint = fingerprint or {}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        with atomic_dir(self.directory) as tmp:
            np.savez(tmp / self.WEIGHTS, *[np.asarray(v) for v in _saved_variables(self.model)])
            if self.keep_best.best_weights is not None:
                np.savez(tmp / self.BEST, *self.keep_best.best_weights)
            state = {"epoch": epoch + 1, "history": self.history, "best": self.keep_best.best,
                     "best_epoch": self.keep_best.best_epoch, "fingerprint": self.fingerprint}
            (tmp / self.STATE).write_text(json.dumps(state), encoding="utf-8")

    @classmethod
    def saved_epochs(cls, directory: Path) -> int:
        """How many epochs the checkpoint in ``directory`` holds."""
        state_file = Path(directory) / cls.STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: no checkpoint to resume from (train without --resume)")
        return json.loads(state_file.read_text(encoding="utf-8"))["epoch"]

    @classmethod
    def restore(cls, directory: Path, model: keras.Model, keep_best: KeepBestWeights,
                fingerprint: dict[str, object] | None = None) -> tuple[int, dict]:
        """Load a checkpoint into a compiled model; returns (epochs done, history so far). A checkpoint written
        with another ``fingerprint`` (training settings and data, see :func:`~siamese_core.train.train`) is a
        ConfigError naming the first key that differs."""
        state = json.loads((Path(directory) / cls.STATE).read_text(encoding="utf-8"))
        saved, now = state.get("fingerprint", {}), fingerprint or {}
        differing = sorted(key for key in {*saved, *now} if saved.get(key) != now.get(key))
        if differing:
            key = differing[0]
            raise ConfigError(f"{directory}: the checkpoint was written by a run with another model config or data "
                              f"({key}: {str(saved.get(key, 'not recorded'))[:60]} there, {str(now.get(key))[:60]} "
                              "now), so it cannot resume this one; use the same settings and data, or train without "
                              "--resume")
        model.optimizer.build(model.embedding.trainable_variables)
        variables = _saved_variables(model)
        arrays = _load_arrays(Path(directory) / cls.WEIGHTS)
        if [a.shape for a in arrays] != [tuple(v.shape) for v in variables]:  # another architecture
            raise ConfigError(f"{directory}: the checkpoint was written by a run with another model config, so it "
                              "cannot resume this one; use the same config, or train without --resume")
        for variable, array in zip(variables, arrays):
            variable.assign(array)
        if (Path(directory) / cls.BEST).is_file():
            keep_best.best_weights = _load_arrays(Path(directory) / cls.BEST)
        keep_best.best, keep_best.best_epoch = state["best"], state["best_epoch"]
        return state["epoch"], state["history"]


def _saved_variables(model: keras.Model) -> list:
    """What a checkpoint holds, in a fixed order: the model's weights, then the optimizer's state."""
    return [*model.weights, *model.optimizer.variables]


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


class FewShotEvaluation(keras.callbacks.Callback):
    """After each epoch, N-way k-shot accuracy on held-out classes, added to the epoch's logs."""

    def __init__(self, embedding: keras.Model, images: np.ndarray, labels: np.ndarray,
                 n_way: int = 20, k_shot: int = 1, episodes: int = 200, batch_size: int = 256):
        super().__init__()
        self.embedding, self.images, self.labels = embedding, images, labels
        self.n_way = min(n_way, len(np.unique(labels)))
        self.k_shot, self.episodes, self.batch_size = k_shot, episodes, batch_size
        self.key = f"fewshot_{self.n_way}way_{k_shot}shot"

    def on_epoch_end(self, epoch, logs=None):
        embeddings = predict_array(self.embedding, self.images, self.batch_size)
        result = few_shot_accuracy(embeddings, self.labels, self.n_way, self.k_shot, self.episodes, seed=0)
        if logs is not None:
            logs[self.key] = result["mean"]


class CollapseGuard(keras.callbacks.Callback):
    """Warns, then stops training, when same-class and other-class distances converge.

    The signal is the gap neg_dist - pos_dist on the training batches, relative to
    neg_dist and to the margin: below ``min_gap`` of either for ``patience`` epochs
    in a row means the embedding has collapsed. The margin term catches the usual
    failure, every image mapped to nearly one point with the loss stuck at the margin,
    where both distances shrink together and their ratio alone stays unremarkable.
    """

    def __init__(self, min_gap: float = 0.05, patience: int = 2, margin: float = 1.0):
        super().__init__()
        self.min_gap, self.patience, self.margin, self.low_epochs = min_gap, patience, margin, 0
        self.collapsed_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "pos_dist" not in logs or "neg_dist" not in logs:
            return
        difference = logs["neg_dist"] - logs["pos_dist"]
        gap = min(difference / max(logs["neg_dist"], 1e-12), difference / self.margin)
        self.low_epochs = self.low_epochs + 1 if gap < self.min_gap else 0
        if self.low_epochs:
            log.warning("epoch %d: embedding collapsing (distance gap %.3g < %.3g; neg %.3g, pos %.3g, margin %g)",
                        epoch + 1, gap, self.min_gap, logs["neg_dist"], logs["pos_dist"], self.margin)
        if self.low_epochs >= self.patience:
            self.collapsed_at = epoch + 1
            log.warning("stopping: positive and negative distances converged for %d epochs", self.patience)
            self.model.stop_training = True
