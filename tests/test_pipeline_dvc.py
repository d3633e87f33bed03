"""The stages and the DVC pipeline: prepare and validate alone, then real `dvc repro` in a temporary git repo."""

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
from PIL import Image

from pipelines import stages
from pipelines.params import load_params
from pipelines.prepare import MARKER
from pipelines.tracking import download_bundle
from siamese_core.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
CODE = ("pipelines/", "siamese_core")


def test_dvc_yaml_declares_what_the_stage_table_declares():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(stages.STAGES)
    for name, stage in stages.STAGES.items():
        entry = declared[name]
        assert entry["cmd"] == f"python -m pipelines.stages {name}"
        assert {d for d in entry["deps"] if not d.startswith(CODE)} == set(stage.deps), name
        assert set(entry["params"]) == set(stage.params), name
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in entry.get("outs", []) + entry.get("metrics", [])]
        assert set(outs) == set(stage.outs), name


def test_prepare_writes_a_seeded_stratified_split(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path / "params.yaml"))
    assert stages.prepare(params) == {"source": "digits", "train": 42, "test": 18}
    train, test = Path(params.data.train_dir), Path(params.data.test_dir)
    assert sorted(p.name for p in train.iterdir() if p.is_dir()) == [f"digit {d}" for d in range(10)]
    image = next(train.glob("digit 3/*.png"))
    assert Image.open(image).size == (32, 32)
    assert not {p.name for p in train.rglob("*.png")} & {p.name for p in test.rglob("*.png")}
    first = stages.data_hash(params)
    stages.prepare(params)
    assert stages.data_hash(params) == first, "prepare is deterministic"

    foreign = tmp_path / "mine"
    (foreign / "cats").mkdir(parents=True)
    (foreign / "cats" / "a.png").write_bytes(image.read_bytes())
    with pytest.raises(DatasetError, match="refusing to replace"):
        stages.prepare(params.model_copy(update={"data": params.data.model_copy(update={"train_dir": str(foreign)})}))
    assert (foreign / "cats" / "a.png").is_file() and not (foreign / MARKER).exists()


def test_validate_lists_every_problem(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(write_params(tmp_path / "params.yaml"))
    stages.prepare(params)
    assert stages.validate(params) == {"train": 42, "test": 18, "classes": 10, "warnings": 0}

    train, test = Path(params.data.train_dir), Path(params.data.test_dir)
    for extra in sorted((train / "digit 9").iterdir())[1:]:
        extra.unlink()
    (train / "digit 2" / "broken.png").write_bytes(b"not a png")
    shutil.copytree(test / "digit 1", test / "digit 11")
    with pytest.raises(DatasetError) as caught:
        stages.validate(params)
    report = json.loads(stages.VALIDATION.read_text())
    errors = {f["code"]: f for f in report["findings"] if f["level"] == "error"}
    assert not report["ok"] and set(errors) == {"corrupt", "small_class", "unknown_test_class"}
    assert errors["corrupt"]["paths"][0].startswith(str(train / "digit 2" / "broken.png"))
    assert "digit 9" in errors["small_class"]["message"] and "digit 11" in errors["unknown_test_class"]["message"]
    assert "3 errors (corrupt, small_class, unknown_test_class)" in str(caught.value)
    text = stages.VALIDATION_TEXT.read_text()
    assert "FAILED" in text and "broken.png" in text
    from mlflow import MlflowClient

    [failed] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("siamese").experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "validate"

    missing = params.model_copy(update={"data": params.data.model_copy(update={"test_dir": "nowhere"})})
    with pytest.raises(DatasetError, match="nowhere: folder does not exist"):
        stages.validate(missing)


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def _project(tmp_path: Path, write_params):
    """A git + DVC repository holding the pipeline code, dvc.yaml and tiny params; returns (repo, run)."""
    repo, env = tmp_path / "repo", _env(tmp_path)
    repo.mkdir()
    for folder in ("pipelines", "siamese_core"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    write_params(repo / "params.yaml")

    def run(*args: str, check: bool = True) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
        output = done.stdout + done.stderr
        assert not check or done.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
        return output

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    shutil.copy(REPO / ".dvcignore", repo)
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    return repo, run, dvc


def _stages(pattern: str, output: str) -> set[str]:
    return set(re.findall(pattern, output))


def test_dvc_repro_reruns_only_what_a_param_change_touches(tmp_path, write_params, monkeypatch):
    repo, run, dvc = _project(tmp_path, write_params)

    first = run(*dvc, "repro")
    assert _stages(r"Running stage '(\w+)'", first) == set(stages.STAGES)
    assert set(json.loads((repo / "metrics.json").read_text())) >= {
        "top1", "top3", "class_avg_accuracy", "map_at_r", "calibration.threshold",
        "baseline_raw_pixels.top1", "baseline_untrained.top1"}
    assert "data:image/png;base64," in (repo / "artifacts/report.html").read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _env(tmp_path)["MLFLOW_TRACKING_URI"])
    registered = json.loads((download_bundle("models:/siamese-recognizer@champion") / "metadata.json").read_text())
    calibration = json.loads((repo / "artifacts/evaluation.json").read_text())["calibration"]
    assert registered["threshold"] == calibration["threshold"]  # the registered bundle carries the threshold
    assert (repo / "artifacts/bundle/model.keras").is_file()
    registration = json.loads((repo / "artifacts/registration.json").read_text())
    assert (registration["version"], registration["decision"]) == ("1", "champion")
    lock = {o["path"]: o["md5"] for o in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]}
    assert registration["data_hash"] == f"{lock['data/digits/train']}+{lock['data/digits/test']}"
    assert registration["sample_prediction"]["image"].startswith("data/digits/test/")

    write_params(repo / "params.yaml", {"train.epochs": 2})
    status = run(*dvc, "status")
    assert _stages(r"(?m)^(\w+):$", status) == {"train", "embed"}, status  # the stages declaring `train`
    second = run(*dvc, "repro")
    assert _stages(r"Running stage '(\w+)'", second) == {"train", "embed", "evaluate", "register"}
    assert _stages(r"Stage '(\w+)' didn't change, skipping", second) == {"prepare", "validate", "triplets"}
    assert json.loads((repo / "artifacts/registration.json").read_text())["version"] == "2"
    assert len(json.loads((repo / "artifacts/train/history.json").read_text())["history"]["loss"]) == 2

    metrics = json.loads(run(*dvc, "metrics", "show", "--json"))
    assert "top1" in json.dumps(metrics)
    plots = run(*dvc, "plots", "show", "--json")
    assert all(title in plots for title in ("Loss per epoch", "Test accuracy per class", "Confusion (test)",
                                            "plots/images/confusion.png"))

    run(*dvc, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    run(*dvc, "push")
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the remote"
    assert "in sync" in run(*dvc, "status", "--cloud")


@pytest.mark.slow
def test_dvc_exp_run_with_a_set_param(tmp_path, write_params):
    repo, run, dvc = _project(tmp_path, write_params)
    run(*dvc, "exp", "run", "-S", "train.epochs=2")
    assert len(json.loads((repo / "artifacts/train/history.json").read_text())["history"]["loss"]) == 2
    assert '"epochs": 2' in run(*dvc, "exp", "show", "--json")


@pytest.mark.parametrize(
    "option, message",
    [("data.train_dir=nowhere", "nowhere: folder does not exist"), ("train.epochz=1", "train.epochz")],
)
def test_stage_command_reports_a_user_error_without_a_traceback(tmp_path, write_params, option, message):
    write_params(tmp_path / "params.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.stages", "validate", "--set", option],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]  # validate prints its readable report first
    assert last.startswith("error: ") and message in last and "Traceback" not in done.stderr
