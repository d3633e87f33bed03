"""Stage embed: the gallery of the training images, embedded by the trained network, as a bundle."""

from __future__ import annotations

import logging

from siamese_core.data import scan_folder
from siamese_core.model import load_embedding
from siamese_core.recognizer import MODEL_FILE, save_trained_bundle

from ..files import read_json
from ..pipeline import BUNDLE, HISTORY_FILE, TRAINED, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Write the bundle artifacts/bundle/ (network, gallery, config, training history)."""
    params = ctx.params
    network = ctx.path(TRAINED / MODEL_FILE)
    gallery = save_trained_bundle(load_embedding(network), scan_folder(params.data.train_dir), params.core(),
                                  ctx.path(BUNDLE), read_json(ctx.path(TRAINED / HISTORY_FILE)),
                                  sharder=ctx.sharder, model_file=network).gallery
    log.info("embed: gallery of %d images in %d classes", len(gallery), len(gallery.class_names))
    return {"gallery_size": len(gallery), "classes": len(gallery.class_names)}
