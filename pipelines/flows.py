"""Prefect flows: training (the pipeline stages as tasks), prediction with the champion, scheduled retraining.

Flows run in Prefect's ephemeral mode by default, and against a server when
``PREFECT_API_URL`` is set. ``python -m pipelines.flows serve`` serves the
retraining flow on the ``schedule`` of params.yaml (scheduling needs a server).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from . import stages
from .params import PipelineParams, load_params

STAMPS = Path(".siamese-cache/stamps")
CODE_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "siamese_core")
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5}


def inputs_key(name: str, params: PipelineParams) -> str:
    """Content key of a stage run: its params values, the content of its inputs, and the code."""
    stage = stages.STAGES[name]
    payload = {
        "stage": name,
        "params": {key: stages.param_value(params, key) for key in stage.params},
        "deps": {str(path): stages.content_hash(path) for path in stage.dep_paths(params)},
        "code": [stages.content_hash(path) for path in CODE_DIRS],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _outs_hashes(name: str, params: PipelineParams) -> dict[str, str]:
    return {str(path): stages.content_hash(path) for path in stages.STAGES[name].out_paths(params)}


def outputs_current(name: str, params: PipelineParams) -> bool:
    """Whether the stage's outputs on disk are exactly those a run with these inputs wrote.

    Another run (a flow with other params, ``dvc repro``) may have replaced them since;
    a cached task result is only reused when this holds.
    """
    stamp = STAMPS / f"{name}.json"
    if not stamp.is_file():
        return False
    recorded = json.loads(stamp.read_text(encoding="utf-8"))
    return recorded == {"key": inputs_key(name, params), "outs": _outs_hashes(name, params)}


def _run_and_stamp(name: str, params: PipelineParams) -> dict:
    """Run a stage, then record which inputs its outputs on disk came from."""
    key = inputs_key(name, params)
    result = stages.STAGES[name].run(params)
    stages.write_json(STAMPS / f"{name}.json", {"key": key, "outs": _outs_hashes(name, params)})
    return result


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return inputs_key(context.task.name, parameters["params"])


@task(name="prepare", **IO_RETRIES)
def prepare_task(params: PipelineParams) -> dict:
    """Write the demo dataset, or check that the data folders exist."""
    return stages.prepare(params)


@task(name="validate", **IO_RETRIES)
def validate_task(params: PipelineParams) -> dict:
    """Check the dataset; fails listing every problem."""
    return stages.validate(params)


@task(name="triplets", cache_key_fn=_cache_key)
def triplets_task(params: PipelineParams) -> dict:
    """Mine the training triplets."""
    return _run_and_stamp("triplets", params)


@task(name="train", cache_key_fn=_cache_key)
def train_task(params: PipelineParams) -> dict:
    """Train the embedding network on the triplets."""
    return _run_and_stamp("train", params)


@task(name="embed", cache_key_fn=_cache_key)
def embed_task(params: PipelineParams) -> dict:
    """Build the gallery and write the model bundle."""
    return _run_and_stamp("embed", params)


@task(name="evaluate", cache_key_fn=_cache_key)
def evaluate_task(params: PipelineParams) -> dict:
    """Score the bundle on the test folder."""
    return _run_and_stamp("evaluate", params)


@task(name="register", **IO_RETRIES)
def register_task(params: PipelineParams) -> dict:
    """Log the run to MLflow and register the model behind the champion gate."""
    return stages.register(params)


@task(name="data-hash")
def data_hash_task(params: PipelineParams) -> str:
    """The content hash of the data folders."""
    return stages.data_hash(params)


@task(name="champion-data-hash", **IO_RETRIES)
def champion_data_hash(model_name: str) -> tuple[str, str | None] | None:
    """The champion's version and the ``data_hash`` tag of its run, or None when there is no champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import CHAMPION, tracking_uri

    client = MlflowClient(tracking_uri())
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(version.version), client.get_run(version.run_id).data.tags.get("data_hash")


@task(name="predict")
def predict_task(images: list[str], model_name: str) -> list[dict]:
    """Recognise image files with the champion, sending them base64-encoded as a served model gets them."""
    import pandas as pd

    from .pyfunc_model import encode_image
    from .tracking import load_champion

    if not images:
        return []
    answers = load_champion(model_name).predict(pd.DataFrame({"image": [encode_image(p) for p in images]}))
    return [
        {"image": image, "label": row.label, "distance": float(row.distance), "top_k": json.loads(row.top_k)}
        for image, row in zip(images, answers.itertuples(index=False))
    ]


@flow(name="siamese-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run prepare, validate, triplets, train, embed, evaluate and register; return the registration.

    The triplets, train, embed and evaluate tasks are cached on the content of their inputs:
    a rerun with the same data, params and code reuses their outputs, as long as nothing
    has replaced those outputs since.
    """
    params = load_params(params_path, overrides)
    prepare_task(params)
    validate_task(params)
    for stage_task in (triplets_task, train_task, embed_task, evaluate_task):
        stage_task.with_options(refresh_cache=not outputs_current(stage_task.name, params))(params)
    return register_task(params)


@flow(name="siamese-predict")
def predict_flow(images: list[str], model_name: str | None = None, params_path: str = "params.yaml") -> list[dict]:
    """Recognise image files with ``models:/<model_name>@champion`` (default: register.model_name)."""
    return predict_task(images, model_name or load_params(params_path).register.model_name)


@flow(name="siamese-retraining", log_prints=True)
def retraining_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run the training flow unless the data is the data the champion was trained on.

    Returns ``{"skipped": True, ...}`` or ``{"skipped": False, **registration}``.
    """
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    current = data_hash_task(params)
    champion = champion_data_hash(params.register.model_name)
    if champion is not None and champion[1] == current:
        logger.info("data unchanged since champion version %s (data_hash %s): skipping training", champion[0], current)
        return {"skipped": True, "data_hash": current, "champion_version": champion[0]}
    logger.info("data_hash %s differs from the champion's (%s): retraining", current, champion)
    return {"skipped": False, **training_flow(params_path, overrides)}


def serve(params_path: str = "params.yaml") -> None:
    """Serve the retraining flow on params.yaml's schedule (blocks; Ctrl-C stops it).

    Scheduled runs need a Prefect server (``prefect server start``, ``PREFECT_API_URL`` set):
    on the ephemeral server Prefect serves the flow for manual runs but schedules nothing.
    """
    from prefect.schedules import Cron

    schedule = load_params(params_path).schedule
    retraining_flow.serve(
        name="siamese-retraining",
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"params_path": params_path},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Prefect flows of the pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the retraining flow on params.yaml's schedule")
    serve_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    serve(args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
