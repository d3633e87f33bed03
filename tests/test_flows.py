"""The Prefect flows on a temporary Prefect server, with a real SQLite-backed MLflow registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import stages
from pipelines.flows import predict_flow, retraining_flow, training_flow
from pipelines.params import load_params

REPO = Path(__file__).resolve().parents[1]
MODEL_FILE = stages.TRAINED / stages.MODEL_FILE


@pytest.fixture
def project(tmp_path, monkeypatch, write_params, prefect_server):
    """A working folder with tiny params and its own MLflow database; returns its MLflow client."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def test_prefect_yaml_deploys_the_retraining_flow_on_the_params_schedule():
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    schedule = load_params(REPO / "params.yaml").schedule
    assert deployment["entrypoint"] == "pipelines/flows.py:retraining_flow"
    assert deployment["schedules"][0]["cron"] == schedule.cron
    assert deployment["schedules"][0]["timezone"] == schedule.timezone


def test_training_flow_registers_a_champion_that_predict_flow_serves(project):
    result = training_flow()
    assert (result["version"], result["decision"]) == ("1", "champion")
    name = result["model_name"]
    assert str(project.get_model_version_by_alias(name, "champion").version) == "1"
    assert project.get_run(result["run_id"]).data.tags["data_hash"] == result["data_hash"]

    gallery_image = next(Path("data/digits/train/digit 7").glob("*.png"))
    [answer] = predict_flow([str(gallery_image)])
    assert answer["label"] == "digit 7"
    assert answer["distance"] < 1e-3
    assert answer["top_k"][0]["label"] == "digit 7"

    trained_at = MODEL_FILE.stat().st_mtime_ns
    again = training_flow()
    assert MODEL_FILE.stat().st_mtime_ns == trained_at, "unchanged inputs: the cached training is reused"
    assert again["version"] == "2"

    training_flow(overrides={"train.epochs": 2})
    retrained_at = MODEL_FILE.stat().st_mtime_ns
    assert retrained_at != trained_at
    training_flow()
    assert MODEL_FILE.stat().st_mtime_ns != retrained_at, "outputs replaced since the cached run: train again"


def test_retraining_flow_skips_training_on_unchanged_data(project):
    first = retraining_flow()
    assert first["skipped"] is False and first["version"] == "1"
    trained_at = MODEL_FILE.stat().st_mtime_ns

    second = retraining_flow()
    assert second == {"skipped": True, "data_hash": first["data_hash"], "champion_version": "1"}
    assert MODEL_FILE.stat().st_mtime_ns == trained_at
    assert len(project.search_model_versions(f"name='{first['model_name']}'")) == 1
