"""Stage train: fit the network on the triplet table, each epoch logged to the pipeline's run."""

from __future__ import annotations

import logging

from siamese_core.io import atomic_dir, ensure_writable
from siamese_core.recognizer import MODEL_FILE
from siamese_core.train import train as fit
from siamese_core.triplets import load_triplets

from ..files import write_json
from ..pipeline import HISTORY_FILE, RUN_FILE, TRAINED, TRIPLETS, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Write artifacts/train/: model.keras, history.json and run.json (the MLflow run that trained it)."""
    params = ctx.params
    ensure_writable(ctx.path(TRAINED).parent, "the trained model")  # before training, not after it
    run = ctx.tracking.run
    with ctx.tracking.system_metrics():
        result = fit(params.core(), params.data.train_dir, params.data.test_dir,
                     triplets=load_triplets(ctx.path(TRIPLETS)), callbacks=[run.epoch_callback()], verbose=0,
                     heldout_dir=params.data.heldout_dir)
    with atomic_dir(ctx.path(TRAINED)) as tmp:
        result.embedding.save(tmp / MODEL_FILE)
        write_json(tmp / HISTORY_FILE, {"best_epoch": result.best_epoch, "history": result.history})
        write_json(tmp / RUN_FILE, {"run_id": run.run_id})
    last = {key: values[-1] for key, values in result.history.items()}
    log.info("train: kept the weights of epoch %d (%s); last epoch: %s", result.best_epoch, result.kept_because,
             ", ".join(f"{key} {value:.4g}" for key, value in last.items()))
    return {"best_epoch": result.best_epoch, **last}


def reused(ctx: StageContext) -> None:
    """A flow reused an earlier run's training: record that run and its curve in this one."""
    ctx.tracking.run.record_reused_training(ctx.path(TRAINED))
