"""Prefect flows: training (the pipeline stages as tasks), prediction with the champion, scheduled retraining.

Each training flow run works in a folder of its own, ``runs/<time>-<flow run>/``, opens
one MLflow run before validation and ends it with the registration (or FAILED with the
error), so two flows started together in one checkout never touch each other's files and
each registers its own model. Stages whose inputs are unchanged are reused from a shared
content-addressed cache. Flows run in Prefect's ephemeral mode by default, and against a
server when ``PREFECT_API_URL`` is set. ``siamese flows serve`` serves the retraining flow
on the ``schedule`` of params.yaml.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect import serve as prefect_serve
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import DeploymentEventTrigger
from prefect.flows import Flow
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL
from prefect.utilities.annotations import unmapped
from prefect_dask import DaskTaskRunner

from siamese_core import sharding
from siamese_core.evaluation_report import EvaluationReport
from siamese_core.sharding import Sharder

from . import pipeline, runner
from .card import run_summary
from .deployments import deployments
from .errors import PIPELINE_USER_ERRORS, PrefectServerError
from .files import read_json
from .inference_log import attach, open_log
from .params import MonitoringConfig, PipelineParams, load_params
from .process import import_tensorflow_quietly, quiet_libraries
from .pyfunc_model import encode_image
from .registry import alias_version, champion_uri, load_champion, model_identity
from .tracking import client, data_hash, pipeline_run, ui_links

RUNS = Path("runs")


def send_stage_logs_to_prefect() -> None:
    """Give the stages' loggers Prefect's API handler, so their lines reach the flow run's logs; quiet the
    libraries' own output (:func:`pipelines.process.quiet_libraries`). Only that handler: whatever else a host
    process hung on Prefect's loggers (a test runner's capture) would then see each line twice."""
    quiet_libraries()
    extra = [handler for handler in logging.getLogger("prefect.extra").handlers if isinstance(handler, APILogHandler)]
    for name in ("pipelines", "siamese_core"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in extra:
            if handler not in logger.handlers:
                logger.addHandler(handler)


def new_workspace() -> Path:
    """A fresh folder for one flow run: ``runs/<UTC time>-<flow run name or pid>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = flow_run.name or f"pid{os.getpid()}"
    workspace = RUNS / f"{stamp}-{name}"
    workspace.mkdir(parents=True, exist_ok=False)
    return workspace


@task(cache_policy=NO_CACHE)
def stage_task(name: str, ctx: pipeline.StageContext) -> dict:
    """One stage in the flow's workspace, or its outputs linked from the cache when its inputs are unchanged."""
    return runner.run_cached(name, ctx)


@task(name="embed-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def embed_shard_task(function: Callable, item: Any) -> Any:
    """One shard of an embedding job, on a Dask worker; retried when it fails or its worker dies."""
    return function(item)


@contextmanager
def dask_sharding(params: PipelineParams) -> Iterator[Sharder | None]:
    """With ``compute.dask_address`` ($SIAMESE_DASK_ADDRESS) set, a sharder whose shards run as ``embed-shard``
    tasks on prefect-dask's DaskTaskRunner connected to that cluster; else None (this process)."""
    address = sharding.dask_address(params.compute.dask_address)
    if address is None:
        yield None
        return

    sharding.check_scheduler(address, params.compute.dask_connect_timeout)  # a scheduler that is not there: one line
    with DaskTaskRunner(address=address, client_kwargs={"timeout": params.compute.dask_connect_timeout}) as runner:

        def mapper(function: Callable, items: list) -> list:
            futures = runner.map(embed_shard_task, parameters={"function": unmapped(function), "item": items})
            return [future.result() for future in futures]

        yield Sharder(mapper, params.compute.shard_size)


def publish_artifacts(record: dict, workspace: Path, experiment_id: str) -> None:
    """The flow run's Prefect artifacts: the decision with links (markdown) and per-class accuracy (table)."""

    run_link, version_link = ui_links(experiment_id, record)
    metrics = read_json(workspace / pipeline.METRICS)
    evaluation = EvaluationReport.read(workspace / pipeline.EVALUATION)
    rows = [("top1", "top1"), ("top5", "top5"), ("map_at_r", "map_at_r"),
            ("1-shot (held-out classes)", "fewshot.1shot.mean"), ("5-shot (held-out classes)", "fewshot.5shot.mean")]
    table = "\n".join(
        f"| {label} | {metrics[key]:.4f} | {metrics.get(f'baseline_raw_pixels.{key}', float('nan')):.4f} "
        f"| {metrics.get(f'baseline_untrained.{key}', float('nan')):.4f} |"
        for label, key in rows if key in metrics)
    previous = record["previous_champion_value"]
    markdown = "\n".join([
        f"# {record['model_name']} version {record['version']}: {record['decision']}",
        "",
        f"`{record['metric']}` {record['value']:.4f} against the champion's "
        f"{'(none before)' if previous is None else f'{previous:.4f}'} on the same test queries. {record['reason']}",
        "",
        evaluation.baseline_check.sentence,
        "",
        "| metric | model | raw pixels | untrained network |",
        "|---|---|---|---|",
        table,
        "",
        f"- MLflow run: [{record['run_name']}]({run_link})",
        f"- Model version: [{record['model_name']} v{record['version']}]({version_link})",
        f"- Data: `{record['data_hash']}`, git commit `{record['git_commit']}`",
        f"- Workspace: `{workspace}` (report: `{workspace / pipeline.REPORT}`)",
    ])
    create_markdown_artifact(markdown=markdown, key="siamese-registration",
                             description=f"Registration of {record['model_name']} v{record['version']}")
    create_table_artifact(
        table=[{"class": name, "accuracy": round(accuracy, 4),
                "precision": round(evaluation.per_class_precision[name], 4)}
               for name, accuracy in evaluation.per_class_accuracy.items()],
        key="siamese-per-class-accuracy", description="Test accuracy (recall) and precision of each class")


START_A_SERVER = ("start one in a second terminal with `prefect server start`, then `export "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api` and run again")


class SiameseFlow(Flow):
    """A Prefect flow whose temporary server, when it does not start in time, is one line that says what to do."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as exc:
            if "ephemeral Prefect API server" not in str(exc):
                raise
            raise PrefectServerError("the temporary Prefect server did not start in time (a busy machine is the "
                                     f"usual cause): {START_A_SERVER}") from None


def siamese_flow(**options: Any) -> Callable[[Callable], SiameseFlow]:
    """``@flow`` for the pipeline's flows: the same options, and a one-line error when Prefect cannot start."""
    return lambda function: SiameseFlow(function, **options)


@siamese_flow(name="siamese-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None) -> dict:
    """Run validate, triplets, train, embed, evaluate and register in this run's own workspace.

    Returns the registration (version, decision, run id, data hash, workspace). A stage whose
    command, params and input contents are unchanged since some earlier run is reused from
    the cache. A failure ends the MLflow run FAILED with the error; nothing is registered.
    """

    send_stage_logs_to_prefect()
    params = load_params(params_path, overrides)
    workspace = new_workspace()
    with pipeline_run(params) as scope:
        run = scope.run
        run.set_tags({"workspace": str(workspace.resolve()), **(tags or {})})
        get_run_logger().info("workspace %s, MLflow run %s", workspace, run.run_id)
        with run.system_metrics(), dask_sharding(params) as sharder:
            ctx = pipeline.StageContext(params, workspace, scope, sharder)
            for name in pipeline.STAGES:
                record = stage_task.with_options(name=name)(name, ctx)
    publish_artifacts(record, workspace, run.info.experiment_id)
    get_run_logger().info("%s", run_summary(record, read_json(workspace / pipeline.METRICS), workspace / pipeline.REPORT,
                                            run.info.experiment_id))
    return {**record, "workspace": str(workspace)}


@task(name="data-hash")
def data_hash_task(params: PipelineParams) -> str:
    """The content hash of the data folders."""

    return data_hash(params)


def _worth_retrying(task, task_run, state) -> bool:
    """A registry read is retried unless it failed on a user error (no such model, a bad name)."""
    return not isinstance(state.result(raise_on_failure=False), PIPELINE_USER_ERRORS)


@task(name="champion-data-hash", retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying)
def champion_data_hash(model_name: str) -> tuple[str, str | None] | None:
    """The champion's version and the ``data_hash`` tag of its run, or None when there is no champion."""

    version = alias_version(model_name)
    if version is None:
        return None
    return str(version.version), client().get_run(version.run_id).data.tags.get("data_hash")


@task(name="predict")
def predict_task(images: list[str], model_name: str, monitoring: MonitoringConfig | None = None) -> list[dict]:
    """Recognise image files with the champion, sending them base64-encoded as a served model gets them; its
    answers go to the inference log that ``monitoring`` names (None: not logged)."""


    if not images:
        return []
    import_tensorflow_quietly()
    champion = load_champion(model_name)
    inference_log = attach(champion, open_log(monitoring, model_identity(champion_uri(model_name)), "flow") if monitoring else None)
    answers = champion.predict(pd.DataFrame({"image": [encode_image(p) for p in images]}))
    if inference_log is not None:
        inference_log.close()
    return [
        {"image": image, "label": row.label, "distance": float(row.distance), "top_k": row.top_k}
        for image, row in zip(images, answers.itertuples(index=False))
    ]


@siamese_flow(name="siamese-predict")
def predict_flow(images: list[str], model_name: str | None = None, params_path: str = "params.yaml") -> list[dict]:
    """Recognise image files with ``models:/<model_name>@champion`` (default: register.model_name); the answers
    go to the inference log of params.yaml's ``monitoring`` section."""
    quiet_libraries()
    params = load_params(params_path)
    return predict_task(images, model_name or params.register.model_name, params.monitoring)


@siamese_flow(name="siamese-retraining", log_prints=True)
def retraining_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                    trigger: str = "manual", monitoring_run_id: str | None = None,
                    monitoring_window: str | None = None) -> dict:
    """Run the training flow unless the data is the data the champion was trained on.

    ``trigger`` says why it runs (``schedule``, ``drift`` with the ``monitoring_run_id`` and ``monitoring_window``
    whose rule fired, or ``manual``); the training run records it with the reason it trained (``new_data``) as tags
    ``retraining.*``. Returns ``{"skipped": True, ...}`` or ``{"skipped": False, **registration}``.
    """
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    current = data_hash_task(params)
    champion = champion_data_hash(params.register.model_name)
    why = f"{trigger}" + (f" (monitoring run {monitoring_run_id}, window {monitoring_window})" if monitoring_run_id else "")
    if champion is not None and champion[1] == current:
        advice = "; label the review queue and import it (siamese feedback import) to add data" if trigger == "drift" else ""
        logger.info("started by %s; data unchanged since champion version %s (data_hash %s): skipping training%s",
                    why, champion[0], current, advice)
        return {"skipped": True, "data_hash": current, "champion_version": champion[0], "trigger": trigger}
    logger.info("started by %s; data_hash %s differs from %s: retraining", why, current,
                f"that of champion version {champion[0]} ({champion[1]})" if champion else "no champion's")
    tags = {"retraining.trigger": trigger, "retraining.reason": "new_data",
            **({"retraining.monitoring_run_id": monitoring_run_id, "retraining.monitoring_window": str(monitoring_window)}
               if monitoring_run_id else {})}
    return {"skipped": False, "trigger": trigger, **training_flow(params_path, overrides, tags)}


@siamese_flow(name="siamese-monitoring", log_prints=True)
def monitoring_flow(params_path: str = "params.yaml", window_hours: float | None = None) -> dict:
    """Judge the last ``window_hours`` (default ``monitoring.window_hours``) of the inference log against the
    served champion's reference profile (:func:`pipelines.monitoring_run.monitor`): the window is the next point
    of the version's MLflow run in the ``<experiment>-monitoring`` experiment, with its HTML report, and a
    Prefect artifact; when a rule of ``monitoring.rules`` fires, it emits ``siamese.monitoring.drift`` (which
    starts the retraining deployment of a Prefect server) and says where the event went. Returns the figures,
    the rules that fired, the shadow and canary records counted apart, the notes, the event's fate, the
    report's location and the run id."""
    from .monitoring_run import monitor  # MLflow loads slowly: only when the flow runs

    return monitor(load_params(params_path), window_hours, get_run_logger())


def serve(params_path: str = "params.yaml") -> None:
    """Serve the deployments of :mod:`pipelines.deployments` (retraining on params.yaml's schedule and on drift,
    monitoring), one run of each at a time (blocks; Ctrl-C stops it).

    Scheduled runs need a Prefect server (``prefect server start``, ``PREFECT_API_URL`` set): without one
    it stops at once with a PrefectServerError that says so.
    """

    if not PREFECT_API_URL.value():
        raise PrefectServerError(f"scheduled runs need a Prefect server (PREFECT_API_URL is not set): {START_A_SERVER}")
    flows = {"pipelines/flows.py:retraining_flow": retraining_flow, "pipelines/flows.py:monitoring_flow": monitoring_flow}
    served = []
    for spec in deployments(load_params(params_path), params_path):
        # to_deployment is sync-compatible: called here, outside any event loop, it returns the deployment
        served.append(flows[spec["entrypoint"]].to_deployment(
            name=spec["name"], description=spec["description"], tags=spec["tags"],
            concurrency_limit=spec["concurrency_limit"], parameters=spec["parameters"],
            schedules=[Cron(s["cron"], timezone=s["timezone"], parameters=s.get("parameters", {}))
                       for s in spec["schedules"]],
            triggers=[DeploymentEventTrigger(name=t["name"], expect=set(t["expect"]), match=t["match"],
                                             parameters=t["parameters"]) for t in spec["triggers"]]))
    prefect_serve(*served)  # type: ignore[arg-type]


@siamese_flow(name="siamese-tuning", log_prints=True)
def tuning_flow(train_dir: str, out: str, minutes: float, trials: int | None = None, test_dir: str | None = None,
                heldout_dir: str | None = None, params_path: str | None = None, pins: dict[str, Any] | None = None,
                dask_address: str | None = None, parallel: int = 2) -> dict:
    """``siamese tune`` as a flow (:func:`pipelines.tuning.tune`, the same code): search the settings that score
    best on ``train_dir`` within ``minutes``, write them to the params file ``out``; returns the study's result
    and logs its summary."""
    from .tuning import summary_text, tune  # Optuna and MLflow load only when the flow runs

    send_stage_logs_to_prefect()
    result = tune(train_dir, out, minutes, trials, test_dir, heldout_dir, params_path, pins, dask_address,
                  parallel=parallel, progress=False)
    get_run_logger().info("%s", summary_text(result))
    return result.to_dict()


@siamese_flow(name="siamese-batch-predict", log_prints=True)
def batch_predict_flow(input_uri: str, out: str, model_uri: str | None = None, dask_address: str | None = None,
                       shard_size: int = 512, params_path: str = "params.yaml") -> dict:
    """``siamese predict-batch`` as a flow (:func:`pipelines.batch_predict.predict_with`, the same code): every image
    under ``input_uri`` recognised by ``model_uri`` (default: the champion) into the Parquet table ``out``, in
    resumable shards; a rerun of a failed flow run skips the shards already written."""
    from .batch_predict import predict_with  # TensorFlow loads only when the flow runs

    quiet_libraries()
    uri = model_uri or f"models:/{load_params(params_path).register.model_name}@champion"
    done = predict_with(uri, input_uri, out, sharding.dask_address(dask_address), shard_size, progress=False)
    get_run_logger().info("%s", done)
    return done
