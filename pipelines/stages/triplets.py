"""Stage triplets: mine the training triplets."""

from __future__ import annotations

import logging

from siamese_core.data import scan_folder
from siamese_core.train import mine_triplets
from siamese_core.triplets import save_triplets

from ..files import write_json
from ..pipeline import TRIPLETS, TRIPLETS_SUMMARY, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Write artifacts/triplets.csv and a summary JSON (strategy, count, triplets per class)."""
    params = ctx.params
    table = mine_triplets(params.core(), scan_folder(params.data.train_dir))
    save_triplets(table, ctx.path(TRIPLETS))
    summary = {
        "strategy": params.triplets.strategy,
        "max_pairs_per_class": params.triplets.max_pairs_per_class,
        "triplets": len(table),
        "per_class": {name: int(n) for name, n in table["anchor_class"].value_counts().sort_index().items()},
    }
    write_json(ctx.path(TRIPLETS_SUMMARY), summary)
    log.info("triplets: %d (%s)", len(table), params.triplets.strategy)
    return {"triplets": len(table), "strategy": params.triplets.strategy}
