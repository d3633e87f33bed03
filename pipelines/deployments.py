"""The Prefect deployments, one table: ``siamese flows serve`` builds them from it, and ``prefect.yaml`` (for
``prefect deploy --all`` with a work pool) must say the same; a test holds the two together, as dvc.yaml is held
to the stage table."""

from __future__ import annotations

from typing import Any

from .monitoring import EVENT
from .params import PipelineParams


def deployments(params: PipelineParams, params_path: str = "params.yaml") -> list[dict[str, Any]]:
    """Each deployment as prefect.yaml writes it: name, description, entrypoint, tags, concurrency limit,
    parameters, schedules and triggers; the crons, time zone and model name come from ``params``."""
    model_name, timezone = params.register.model_name, params.schedule.timezone
    return [
        {
            "name": "siamese-retraining",
            "description": "Retrain and register when the data changed since the champion was trained.",
            "entrypoint": "pipelines/flows.py:retraining_flow",
            "tags": ["siamese", "retraining"],
            "concurrency_limit": 1,
            "parameters": {"params_path": params_path},
            "schedules": [{"cron": params.schedule.cron, "timezone": timezone, "parameters": {"trigger": "schedule"}}],
            "triggers": [{
                "type": "event",
                "name": f"retrain {model_name} on drift",
                "match": {"prefect.resource.id": f"siamese.model.{model_name}"},
                "expect": [EVENT],
                "parameters": {"params_path": params_path, "trigger": "drift",
                               "monitoring_run_id": "{{ event.payload.monitoring_run_id }}",
                               "monitoring_window": "{{ event.payload.window }}"},
            }],
        },
        {
            "name": "siamese-monitoring",
            "description": "Judge the inference log's last window against the served version's reference profile.",
            "entrypoint": "pipelines/flows.py:monitoring_flow",
            "tags": ["siamese", "monitoring"],
            "concurrency_limit": 1,
            "parameters": {"params_path": params_path},
            "schedules": [{"cron": params.monitoring.cron, "timezone": timezone}],
            "triggers": [],
        },
    ]
