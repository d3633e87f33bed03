"""One owner of the pipeline: each stage's inputs are the code it really imports, and one run
lifecycle ends the MLflow run FAILED whichever stage fails, under either driver."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import imports, pipeline, runner
from pipelines.files import read_json
from pipelines.params import load_params
from pipelines.pipeline import STAGES, StageContext, stage_key
from pipelines.tracking import ending, pipeline_run
from siamese_core.errors import BundleError, DatasetError

from support.project import write_tiny_demo_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch, write_params):
    """A project folder with tiny params and data and its own MLflow store; returns (params, client)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_tiny_demo_data(tmp_path)
    return load_params(write_params(tmp_path / "params.yaml")), MlflowClient(uri)


def _runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("siamese").experiment_id], order_by=["start_time ASC"])


def test_a_stage_depends_on_every_module_it_imports_and_on_nothing_else():
    validate = STAGES["validate"].code()
    assert "pipelines/files.py" in validate, "validate imports pipelines.files (the stale-cache bug)"
    assert {"pipelines/stages/validate.py", "siamese_core/validation.py", "pipelines/presets"} <= set(validate)
    assert not {"pipelines/card.py", "pipelines/registry.py", "siamese_core/train.py"} & set(validate)
    assert {"pipelines/card.py", "pipelines/registry.py"} <= set(STAGES["register"].code())


def test_dvc_yaml_is_written_from_the_stage_table_and_optional_folders_need_no_edit(project):
    params, _ = project
    assert (REPO / "dvc.yaml").read_text() == pipeline.dvc_yaml(load_params(REPO / "params.yaml")), \
        "dvc.yaml is stale: run `siamese dvc-yaml`"
    without = params.model_copy(update={"data": params.data.model_copy(update={"heldout_dir": None})})
    assert "${data.heldout_dir}" in pipeline.dvc_yaml(params)
    assert "${data.heldout_dir}" not in pipeline.dvc_yaml(without)
    assert "data.heldout_dir" in pipeline.dvc_yaml(without)  # still a params key of the stages that read it


def test_the_flows_stage_runner_reruns_a_stage_whose_imported_code_changed(project, monkeypatch, tmp_path):
    params, _ = project
    code = tmp_path / "code"
    for package in imports.OWN_PACKAGES:
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(imports, "PROJECT", code)
    workspace = tmp_path / "runs" / "one"
    workspace.mkdir(parents=True)
    with pipeline_run(params) as scope:
        ctx = StageContext(params, workspace, scope)
        assert "cached" not in runner.run_cached("validate", ctx)
        assert runner.run_cached("validate", ctx)["cached"] is True
        key = stage_key(STAGES["validate"], params, workspace)
        with (code / "pipelines" / "card.py").open("a") as file:
            file.write("\n# a change to a module validate does not import\n")
        assert stage_key(STAGES["validate"], params, workspace) == key
        assert runner.run_cached("validate", ctx)["cached"] is True
        with (code / "pipelines" / "files.py").open("a") as file:
            file.write("\n# a change to a module validate imports\n")
        assert stage_key(STAGES["validate"], params, workspace) != key
        assert "cached" not in runner.run_cached("validate", ctx), "validate was reused after its code changed"


def _train(params) -> str:
    for name in ("validate", "triplets", "train"):
        runner.run_alone(name, params)
    return read_json(pipeline.TRAINED / pipeline.RUN_FILE)["run_id"]


def _assert_failed(client: MlflowClient, run_id: str, stage: str, message: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FAILED", f"{stage} failed but its run is {run.info.status}"
    assert run.data.tags["failed_stage"] == stage and message in run.data.tags["error"]


def test_under_dvc_a_failing_embed_evaluate_or_sample_prediction_fails_the_training_run(project, monkeypatch):
    params, client = project
    trained_by = _train(params)
    assert client.get_run(trained_by).info.status == "RUNNING"  # train opens the run; later stages end it
    (pipeline.TRAINED / "model.keras").write_bytes(b"not a model")
    with pytest.raises(BundleError):
        runner.run_alone("embed", params)
    _assert_failed(client, trained_by, "embed", "model.keras")

    trained_by = _train(params)
    runner.run_alone("embed", params)
    broken = params.model_copy(update={"data": params.data.model_copy(update={"test_dir": "nowhere"})})
    with pytest.raises(DatasetError, match="nowhere"):
        runner.run_alone("evaluate", broken)
    _assert_failed(client, trained_by, "evaluate", "nowhere")

    trained_by = _train(params)
    for name in ("embed", "evaluate"):
        runner.run_alone(name, params)
    from pipelines import registry
    from pipelines.errors import RegistryError

    def unreachable(model_name):
        raise RegistryError(f"{model_name}: the artifact store did not answer")

    monkeypatch.setattr(registry, "load_champion", unreachable)  # the artifact store failing after registration
    with pytest.raises(RegistryError, match="did not answer"):
        runner.run_alone("register", params)
    _assert_failed(client, trained_by, "register", "did not answer")
    assert not pipeline.REGISTRATION.exists()
    assert [a.path for a in client.list_artifacts(trained_by) if a.path == "report.html"] == ["report.html"], \
        "the report was logged while the run was open"


def test_under_dvc_one_run_spans_train_to_register_and_ends_finished(project):
    params, client = project
    trained_by = _train(params)
    for name in ("embed", "evaluate"):
        runner.run_alone(name, params)
        assert client.get_run(trained_by).info.status == "RUNNING"
    record = runner.run_alone("register", params)
    assert record["run_id"] == trained_by and client.get_run(trained_by).info.status == "FINISHED"
    assert len(_runs(client)) == 1


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (DatasetError("a bad folder"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_run_opened_outside_a_pipeline_ends_with_its_block_as_a_pipeline_run_does(tmp_path, raised, status):
    """A tuning study or trial, or an erasure's audit run: FINISHED, FAILED with the error and error.txt, or KILLED."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("outside", (tmp_path / "artifacts").as_uri())).info.run_id
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext():
        with ending(client, run_id):
            if raised:
                raise raised
    run = client.get_run(run_id)
    assert run.info.status == status
    if isinstance(raised, DatasetError):
        assert run.data.tags["error"] == "DatasetError: a bad folder"
        assert "a bad folder" in Path(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
