"""The Prefect flows on a temporary Prefect server, with a real SQLite-backed MLflow registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import pipeline
from pipelines.files import content_hash
from pipelines.flows import predict_flow, retraining_flow, training_flow
from pipelines.params import load_params
from siamese_core.recognizer import MODEL_FILE

from support.project import write_tiny_demo_data

REPO = Path(__file__).resolve().parents[1]
NAME = "siamese-recognizer"


@pytest.fixture
def project(tmp_path, monkeypatch, write_params, prefect_server):
    """A project folder (dvc.yaml, tiny params, tiny demo data) with its own MLflow database; returns its client."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    write_tiny_demo_data(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    return MlflowClient(uri)


def _flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [entry.message for entry in logs]


def test_prefect_yaml_says_what_the_deployments_table_says():
    """prefect.yaml (prefect deploy --all) and `siamese flows serve` deploy the same flows from one table:
    the crons, time zone and model name of params.yaml, a drift event of this model starting the retraining."""
    from pipelines.deployments import deployments

    table = deployments(load_params(REPO / "params.yaml"))
    written = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert [{"triggers": [], **{k: v for k, v in d.items() if k != "work_pool"}} for d in written] == table
    assert {d["work_pool"]["name"] for d in written} == {"siamese"}
    [trigger] = table[0]["triggers"]
    assert trigger["expect"] == ["siamese.monitoring.drift"] and trigger["parameters"]["trigger"] == "drift"


def test_flows_serve_builds_each_deployment_of_the_table(monkeypatch):
    """What `siamese flows serve` hands Prefect: the table's deployments, schedules and drift trigger."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import flows
    from pipelines.deployments import deployments

    served = []
    monkeypatch.setattr(flows, "prefect_serve", lambda *deployed: served.extend(deployed))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never called: serving is replaced
        flows.serve(str(REPO / "params.yaml"))
    table = deployments(load_params(REPO / "params.yaml"), str(REPO / "params.yaml"))
    assert [d.name for d in served] == [spec["name"] for spec in table]
    for deployment, spec in zip(served, table):
        assert deployment.parameters == spec["parameters"] and deployment.concurrency_limit == 1
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in spec["schedules"]]
        assert [t.name for t in deployment.triggers] == [t["name"] for t in spec["triggers"]]


def test_training_flow_tracks_one_run_and_registers_a_champion_that_predict_flow_serves(project):
    from prefect.artifacts import Artifact

    state = training_flow(return_state=True)
    result = state.result()
    assert (result["version"], result["decision"]) == ("1", "champion")
    run = project.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == result["run_name"] and "small_cnn" in run.info.run_name
    tags = run.data.tags
    assert tags["data_hash"] == result["data_hash"] and tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert len(project.get_metric_history(run.info.run_id, "loss")) == 1  # one point per epoch
    assert any(key.startswith("system/") for key in run.data.metrics), "system metrics are logged"
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs["demo-train"].digest == content_hash("data/demo/train").removesuffix(".dir")
    assert json.loads(inputs["demo-heldout"].profile)["classes"] == 6
    card = project.get_model_version(NAME, "1").description
    assert "## Data" in card and content_hash("data/demo/train") in card and "raw pixels" in card
    workspace = Path(result["workspace"])
    assert workspace.parent.name == "runs" and (workspace / pipeline.BUNDLE / MODEL_FILE).is_file()
    assert f"{NAME} version 1" in (workspace / pipeline.REPORT).read_text()

    messages = _flow_logs(state.state_details.flow_run_id)
    assert any(m.startswith("evaluate: top1") for m in messages), "the stages' log lines reach the flow run"
    assert any(m.startswith("epoch 1/1") for m in messages)
    markdown = Artifact.get("siamese-registration")
    assert markdown is not None and "champion" in markdown.data and result["run_id"] in markdown.data
    assert Artifact.get("siamese-per-class-accuracy") is not None

    gallery_image = next(Path("data/demo/train").glob("*/*.png"))
    [answer] = predict_flow([str(gallery_image)])
    assert answer["label"] == gallery_image.parent.name
    assert answer["distance"] < 1e-3

    again = training_flow()
    assert again["version"] == "2" and again["workspace"] != result["workspace"]
    second = project.get_run(again["run_id"])
    assert second.data.tags["training_run_id"] == result["run_id"], "unchanged inputs: the training is reused"
    assert second.info.run_name != run.info.run_name
    first_model = workspace / pipeline.TRAINED / MODEL_FILE
    assert (Path(again["workspace"]) / pipeline.TRAINED / MODEL_FILE).read_bytes() == first_model.read_bytes()
    assert len(project.get_metric_history(again["run_id"], "loss")) == 1, "the reused curve is logged on the new run"


@pytest.mark.slow  # two whole training flows side by side, about 40 s: with the slow tests, which CI runs
def test_two_flows_started_together_each_register_their_own_model(project, tmp_path):
    """Two processes on one Prefect server, one MLflow store and one checkout, with different epochs."""
    from prefect.settings import PREFECT_API_URL

    code = ("import json, sys; from pipelines.flows import training_flow; "
            "print('RESULT', json.dumps(training_flow(overrides={'train.epochs': int(sys.argv[1])})))")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(epochs)], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for epochs in (2, 3)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    results = {}
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        results[result["version"]] = result
    assert set(results) == {"1", "2"}
    seen = set()
    for version, result in results.items():
        run = project.get_run(project.get_model_version(NAME, version).run_id)
        epochs = int(run.data.params["train.epochs"])
        history = json.loads((Path(result["workspace"]) / pipeline.TRAINED / pipeline.HISTORY_FILE).read_text())["history"]
        assert len(history["loss"]) == epochs, "the version carries the model its own run trained"
        assert len(project.get_metric_history(run.info.run_id, "loss")) == epochs
        downloaded = Path(project.download_artifacts(run.info.run_id, "model/artifacts/bundle/metadata.json"))
        assert len(json.loads(downloaded.read_text())["history"]["loss"]) == epochs
        seen.add(epochs)
        print(f"version {version}: run {run.info.run_name}, train.epochs {epochs}, bundle history of {epochs} epochs")
    assert seen == {2, 3}
    assert results["1"]["workspace"] != results["2"]["workspace"]


def test_a_bad_dataset_fails_the_run_once_and_registers_nothing(project):
    broken = next(Path("data/demo/train").glob("*/*.png"))
    broken.write_bytes(b"not a png")
    state = training_flow(return_state=True)
    assert state.is_failed()
    [run] = project.search_runs([project.get_experiment_by_name("siamese").experiment_id])
    assert run.info.status == "FAILED" and "dataset validation failed" in run.data.tags["error"]
    assert broken.name in run.data.tags["error"] or "corrupt" in run.data.tags["error"]
    assert project.search_registered_models() == []

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])))
    [validate] = [t for t in task_runs if t.name.startswith("validate")]
    assert validate.run_count == 1, "a deterministic failure is not retried"


def test_a_failing_evaluate_ends_the_flows_run_failed_and_registers_nothing(project, monkeypatch):
    from pipelines.stages import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(evaluate, "assess_bundle", broken)
    state = training_flow(return_state=True)
    assert state.is_failed()
    [run] = project.search_runs([project.get_experiment_by_name("siamese").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "evaluate"
    assert "the evaluation broke" in run.data.tags["error"]
    assert project.search_registered_models() == []


def test_retraining_skips_unchanged_data_and_trains_on_added_data(project):
    first = retraining_flow()
    assert first["skipped"] is False and first["version"] == "1"
    second = retraining_flow()
    assert second == {"skipped": True, "data_hash": first["data_hash"], "champion_version": "1", "trigger": "manual"}

    some_class = next(Path("data/demo/train").iterdir())
    shutil.copy(next(some_class.glob("*.png")), some_class / "added.png")
    third = retraining_flow(overrides={"train.epochs": 2})
    assert third["skipped"] is False and third["data_hash"] != first["data_hash"]
    run = project.get_run(third["run_id"])
    assert run.data.tags["data_hash"] == third["data_hash"] and run.data.tags["retraining.trigger"] == "manual"
    train_input = next(d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == "demo-train")
    assert train_input.digest == content_hash("data/demo/train").removesuffix(".dir")
    assert (some_class / "added.png").is_file(), "no run rewrites the data"


@pytest.mark.slow  # two whole training flows, about 25 s: with the slow tests, which CI runs
def test_from_the_demo_to_your_own_data_your_model_is_the_champion(project, write_params, tmp_path):
    """The README's walk-through: the demo, then params.yaml pointed at your own data. The new model serves at
    models:/siamese-recognizer@champion without a hand promotion, and the gate says why."""
    from support.images import make_digits_dataset

    demo = training_flow()
    assert demo["decision"] == "champion"
    train_dir, test_dir = make_digits_dataset(tmp_path / "my-data", classes=4, train_per_class=6, test_per_class=3)
    heldout_dir, _ = make_digits_dataset(tmp_path / "my-heldout", classes=2, test_per_class=0, first=4)
    write_params(tmp_path / "params.yaml", {"data.train_dir": str(train_dir), "data.test_dir": str(test_dir),
                                            "data.heldout_dir": str(heldout_dir)})
    own = training_flow()
    assert own["decision"] == "champion" and "serves other classes" in own["reason"], own["reason"]
    assert own["previous_champion_value"] is None  # the demo's figures are not compared with these
    aliases = project.get_registered_model(NAME).aliases
    assert (aliases["champion"], aliases["previous"]) == (int(own["version"]), int(demo["version"]))
    image = sorted(Path(train_dir).glob("*/*.png"))[0]
    [answer] = predict_flow([str(image)])
    assert answer["label"] == image.parent.name and answer["distance"] < 1e-3  # a digit, not an Omniglot character


def _without_prefect_server(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}


def test_a_temporary_prefect_server_that_does_not_start_is_one_line_saying_what_to_do(tmp_path):
    """Prefect's own start-up wait, set to 0 s, stands for a machine too busy to start the server in time."""
    code = ("from pipelines.errors import PrefectServerError\nfrom pipelines.flows import predict_flow\n"
            "try:\n    predict_flow([])\nexcept PrefectServerError as error:\n    print('ERROR', error)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=_without_prefect_server(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"))
    [line] = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert "did not start in time" in line and "prefect server start" in line and "PREFECT_API_URL" in line, done
    assert "Traceback" not in done.stdout + done.stderr


def test_flows_serve_without_a_prefect_server_says_so_in_one_line(tmp_path):
    """Scheduling needs a server; without one the command stops at once instead of serving runs that never come."""
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "flows", "serve"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=_without_prefect_server(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "PREFECT_API_URL is not set" in done.stderr and "prefect server start" in done.stderr
