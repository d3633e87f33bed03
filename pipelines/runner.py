"""Running a stage: the one code path both drivers take.

``siamese stage <name>`` (what dvc.yaml runs) calls :func:`run_alone`: one stage in the project,
inside the pipeline's MLflow run (opened by train, ended by register, FAILED by any failure).
The Prefect flow calls :func:`run_cached` for each stage inside one run it owns; a stage whose
inputs (:func:`pipelines.pipeline.stage_key`) are unchanged is linked from the cache instead.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from siamese_core import sharding

from . import stagecache
from .params import PipelineParams
from .pipeline import STAGES, TRAINED, StageContext, stage_key
from .tracking import pipeline_run

log = logging.getLogger(__name__)
LAST_STAGE = list(STAGES)[-1]


def run_stage(name: str, ctx: StageContext) -> dict:
    """Run stage ``name`` in ``ctx``'s workspace."""
    ctx.tracking.stage = name
    return importlib.import_module(STAGES[name].module).run(ctx)


def run_cached(name: str, ctx: StageContext) -> dict:
    """Run stage ``name``, or link its outputs from the cache when its inputs are unchanged (a stage
    with side effects beyond its outputs, register, always runs). A reused stage's module may record
    the reuse in the run (``reused(ctx)``)."""
    stage = STAGES[name]
    if not stage.cacheable:
        log.info("%s: running", name)
        return run_stage(name, ctx)
    key = stage_key(stage, ctx.params, ctx.workspace)
    cached = stagecache.restore(stage, key, ctx.workspace)
    if cached is None:
        log.info("%s: running (inputs %s not seen before)", name, key[:12])
        result = run_stage(name, ctx)
        stagecache.store(stage, key, ctx.workspace, result)
        return result
    log.info("%s: inputs unchanged, reusing outputs %s", name, key[:12])
    ctx.tracking.stage = name
    reused = getattr(importlib.import_module(stage.module), "reused", None)
    if reused is not None:
        reused(ctx)
    return {**cached, "cached": True}


def run_alone(name: str, params: PipelineParams, root: Path = Path(".")) -> dict:
    """Run one stage as its own process does under ``dvc repro``: stages after train attach to the
    run that trained the model while it is open; the last stage ends it. Large embedding jobs go to
    the Dask cluster of ``compute.dask_address`` ($SIAMESE_DASK_ADDRESS), if one is set."""
    order, compute = list(STAGES), params.compute
    trained = root / TRAINED if order.index(name) > order.index("train") else None
    with (pipeline_run(params, trained, end=name == LAST_STAGE) as scope,
          sharding.on_dask(sharding.dask_address(compute.dask_address), compute.shard_size,
                           compute.dask_connect_timeout) as sharder):
        return run_stage(name, StageContext(params, root, scope, sharder))
