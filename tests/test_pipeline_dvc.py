"""The stages and the DVC pipeline: validate alone, then real `dvc repro` and `dvc exp` in a temporary git repo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.params import load_params
from pipelines.pipeline import STAGES, VALIDATION, VALIDATION_TEXT
from pipelines.registry import download_bundle
from pipelines.runner import run_alone
from siamese_core.errors import DatasetError

from support.project import dvc_env, dvc_project, write_tiny_demo_data

REPO = Path(__file__).resolve().parents[1]


def test_validate_lists_every_problem(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(write_params(tmp_path / "params.yaml"))
    write_tiny_demo_data(tmp_path)
    assert run_alone("validate", params) == {"train": 24, "test": 6, "classes": 6, "warnings": 0}

    train, test = Path(params.data.train_dir), Path(params.data.test_dir)
    one, two, three = sorted(p for p in train.iterdir())[:3]
    for extra in sorted(one.iterdir())[1:]:
        extra.unlink()
    (two / "broken.png").write_bytes(b"not a png")
    shutil.copytree(test / three.name, test / "Nowhere__character99")
    with pytest.raises(DatasetError) as caught:
        run_alone("validate", params)
    report = json.loads(VALIDATION.read_text())
    errors = {f["code"]: f for f in report["findings"] if f["level"] == "error"}
    assert not report["ok"] and set(errors) == {"corrupt", "small_class", "unknown_test_class"}
    assert errors["corrupt"]["paths"][0].startswith(str(two / "broken.png"))
    assert one.name in errors["small_class"]["message"]
    assert "Nowhere__character99" in errors["unknown_test_class"]["message"]
    assert "3 errors (corrupt, small_class, unknown_test_class)" in str(caught.value)
    text = VALIDATION_TEXT.read_text()
    assert "FAILED" in text and "broken.png" in text

    [failed] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("siamese").experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "validate"
    assert "dataset validation failed" in failed.data.tags["error"]

    missing = params.model_copy(update={"data": params.data.model_copy(update={"test_dir": "nowhere"})})
    with pytest.raises(DatasetError, match="nowhere: folder does not exist"):
        run_alone("validate", missing)


def _stages(pattern: str, output: str) -> set[str]:
    return set(re.findall(pattern, output))


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return next(d["md5"] for d in lock["deps"] if d["path"] == path)


@pytest.mark.slow  # about 100 s: four dvc repro runs; CI runs it with the slow tests
def test_dvc_repro_tracks_one_run_and_reruns_only_what_a_param_change_touches(tmp_path, write_params, monkeypatch):
    repo, run, dvc = dvc_project(tmp_path, write_params)
    client = MlflowClient(dvc_env(tmp_path)["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dvc_env(tmp_path)["MLFLOW_TRACKING_URI"])
    names = set(STAGES)

    first = run(*dvc, "repro")
    assert _stages(r"Running stage '(\w+)'", first) == names
    assert set(json.loads((repo / "metrics.json").read_text())) >= {
        "top1", "top3", "class_avg_accuracy", "map_at_r", "calibration.threshold", "fewshot.1shot.mean",
        "baseline_raw_pixels.top1", "baseline_untrained.top1", "baseline_raw_pixels.fewshot.1shot.mean"}
    report = (repo / "artifacts/report.html").read_text()
    assert "data:image/png;base64," in report and "siamese-recognizer version 1" in report
    registered = json.loads((download_bundle("models:/siamese-recognizer@champion") / "metadata.json").read_text())
    calibration = json.loads((repo / "artifacts/evaluation.json").read_text())["calibration"]
    assert registered["threshold"] == calibration["threshold"]  # the registered bundle carries the threshold
    registration = json.loads((repo / "artifacts/registration.json").read_text())
    assert (registration["version"], registration["decision"]) == ("1", "champion")
    train_md5, test_md5 = _lock_md5(repo, "validate", "data/demo/train"), _lock_md5(repo, "validate", "data/demo/test")
    assert registration["data_hash"] == f"{train_md5}+{test_md5}"
    assert registration["sample_prediction"]["image"].startswith("data/demo/test/")

    # one MLflow run spans train to register: opened by train, finished by register
    opened_by_train = json.loads((repo / "artifacts/train/run.json").read_text())["run_id"]
    assert registration["run_id"] == opened_by_train
    mlflow_run = client.get_run(opened_by_train)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["git_commit"] == run("git", "rev-parse", "HEAD").strip()
    assert {d.dataset.digest for d in mlflow_run.inputs.dataset_inputs} >= {train_md5.removesuffix(".dir")}
    assert len(client.get_metric_history(opened_by_train, "loss")) == 1
    experiment = client.get_experiment(mlflow_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    write_params(repo / "params.yaml", {"train.epochs": 2})
    status = run(*dvc, "status")
    assert _stages(r"(?m)^(\w+):$", status) == {"train", "embed"}, status  # the stages declaring `train`
    second = run(*dvc, "repro")
    assert _stages(r"Running stage '(\w+)'", second) == {"train", "embed", "evaluate", "register"}
    assert _stages(r"Stage '(\w+)' didn't change, skipping", second) == {"validate", "triplets"}
    assert json.loads((repo / "artifacts/registration.json").read_text())["version"] == "2"
    assert len(json.loads((repo / "artifacts/train/history.json").read_text())["history"]["loss"]) == 2

    shown = json.loads(run(*dvc, "metrics", "show", "--json"))
    [workspace] = shown.values()
    assert workspace["data"]["metrics.json"]["data"] == json.loads((repo / "metrics.json").read_text())
    assert "plots/images/confusion.png" in run(*dvc, "plots", "show", "--json")
    run(*dvc, "plots", "show", "-o", "dvc_plots")
    page = (repo / "dvc_plots/index.html").read_text()
    assert "<img" in page and "vega" not in page.split("<body")[1], "the plots page needs nothing from the network"

    run(*dvc, "push")  # .dvc/config's remote: a folder in the project
    assert any((repo / "dvc-storage").rglob("*")), "dvc push wrote nothing to the remote"
    assert "in sync" in run(*dvc, "status", "--cloud")

    # a stage's deps are the code it imports: editing pipelines/files.py (which validate imports) re-runs validate
    with (repo / "pipelines/files.py").open("a") as file:
        file.write("\n# edited\n")
    assert "validate" in _stages(r"(?m)^(\w+):$", run(*dvc, "status"))
    assert _stages(r"Running stage '(\w+)'", run(*dvc, "repro", "-s", "validate")) == {"validate"}


@pytest.mark.slow  # three retraining flows in fresh processes, about 45 s: with the slow tests, which CI runs
def test_add_data_and_retrain_walkthrough(tmp_path, write_params, prefect_server):
    """The README's walkthrough: add images, `dvc add`, commit; the retraining flow sees the new data version."""
    from prefect.settings import PREFECT_API_URL

    repo, run, dvc = dvc_project(tmp_path, write_params, {"PREFECT_API_URL": PREFECT_API_URL.value()})
    client = MlflowClient(dvc_env(tmp_path)["MLFLOW_TRACKING_URI"])
    retrain = (sys.executable, "-c", "import json; from pipelines.flows import retraining_flow; "
               "print('RESULT', json.dumps(retraining_flow()))")

    def retraining() -> dict:
        output = run(*retrain)
        return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])

    first = retraining()
    assert first["skipped"] is False
    assert retraining()["skipped"] is True

    some_class = sorted((repo / "data/demo/train").iterdir())[0]
    shutil.copy(sorted(some_class.glob("*.png"))[0], some_class / "new-drawing.png")
    run(*dvc, "add", "-q", "data/demo")
    run("git", "commit", "-qam", "one more drawing")
    third = retraining()
    assert third["skipped"] is False and third["data_hash"] != first["data_hash"]
    mlflow_run = client.get_run(third["run_id"])
    assert mlflow_run.data.tags["data_hash"] == third["data_hash"]
    assert mlflow_run.data.tags["git_commit"] == run("git", "rev-parse", "HEAD").strip()
    new_train = yaml.safe_load((repo / "data/demo.dvc").read_text())["outs"][0]["md5"]
    assert new_train != first["data_versions"]["train"]
    train_input = next(d.dataset for d in mlflow_run.inputs.dataset_inputs if d.dataset.name == "demo-train")
    assert train_input.digest == third["data_versions"]["train"].removesuffix(".dir")
    assert (some_class / "new-drawing.png").is_file()


@pytest.mark.slow
def test_queued_experiments_do_not_stack_and_log_to_the_project_store(tmp_path, write_params):
    repo, run, dvc = dvc_project(tmp_path, write_params)
    run(*dvc, "exp", "run", "--queue", "-S", "train.epochs=2", "-n", "two-epochs")
    run(*dvc, "exp", "run", "--queue", "-S", "model.margin=0.3", "-n", "margin")
    run(*dvc, "exp", "run", "--run-all", "-j", "1")  # runs the queue, each in a temporary copy
    client = MlflowClient(dvc_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("siamese").experiment_id])
    by_experiment = {r.data.tags.get("dvc.experiment"): r for r in runs}
    assert by_experiment["two-epochs"].data.params["train.epochs"] == "2"
    assert by_experiment["margin"].data.params["train.epochs"] == "1", "the second experiment did not inherit epochs=2"
    assert by_experiment["margin"].data.params["model.margin"] == "0.3"
    assert all(r.info.run_name.startswith(r.data.tags["dvc.experiment"]) for r in by_experiment.values())


@pytest.mark.parametrize(
    "option, message",
    [("data.train_dir=nowhere", "nowhere: folder does not exist"), ("train.epochz=1", "train.epochz")],
)
def test_stage_command_reports_a_user_error_without_a_traceback(tmp_path, write_params, option, message):
    write_params(tmp_path / "params.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "stage", "validate", "--set", option],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]  # validate prints its readable report first
    assert last.startswith("error: ") and message in last and "Traceback" not in done.stderr
