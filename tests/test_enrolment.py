"""Enrolling new classes without retraining: in the library, and as a new registered version (MLflow on SQLite)."""

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipelines import enrolment, registry
from pipelines.cli import app
from pipelines.pyfunc_model import encode_image
from siamese_core.errors import DatasetError
from siamese_core.recognizer import SiameseRecognizer

from support.images import make_digits_dataset
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

NAME = "tiny-recognizer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def new_class(tmp_path):
    """A folder holding one class the bundle has never seen: digit 7."""
    train_dir, _ = make_digits_dataset(tmp_path / "new", classes=1, train_per_class=4, test_per_class=0, first=7)
    return train_dir


def test_enrolled_class_is_predicted_and_the_network_unchanged(bundle, new_class):
    recognizer = SiameseRecognizer.load(bundle.path)
    weights = [w.copy() for w in recognizer.embedding.get_weights()]
    image = next((new_class / "digit 7").iterdir())
    assert recognizer.predict_one(image).label != "digit 7"
    recognizer.enroll(new_class)
    match = recognizer.predict_one(image)
    assert (match.label, match.nearest_path) == ("digit 7", str(image)) and match.distance < 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(weights, recognizer.embedding.get_weights()))


def test_a_class_named_unknown_cannot_be_enrolled(bundle, new_class):
    (new_class / "digit 7").rename(new_class / "unknown")
    recognizer = SiameseRecognizer.load(bundle.path)
    before = len(recognizer.gallery)
    with pytest.raises(DatasetError, match="named 'unknown'"):
        recognizer.enroll(new_class)
    assert len(recognizer.gallery) == before


def test_enrolment_registers_a_new_version_and_moves_aliases_as_documented(bundle, new_class, monkeypatch, tmp_path):
    use_sqlite_store(monkeypatch, tmp_path)
    metrics = {"top1": 0.5, "per_class_accuracy": {"digit 0": 0.5}}
    register_bundle(pipeline_params(NAME), bundle.path, metrics, bundle.history, [], {"git_commit": "x"},
                              score_champion=logged_scorer())

    result = enrolment.enroll_and_register(NAME, new_class)
    assert (result["version"], result["alias"], result["enrolled_from"]) == ("2", "enrolled", "1")
    assert result["new_classes"] == ["digit 7"]
    client = MlflowClient()
    assert client.get_registered_model(NAME).aliases == {"champion": 1, "enrolled": 2}
    assert client.get_model_version(NAME, "2").tags["enrolled_from"] == "1"
    run = client.get_run(result["run_id"])
    assert run.data.tags["enrolled_from"] == "1" and run.data.metrics["new_classes"] == 1

    downloaded = SiameseRecognizer.load(registry.download_bundle(f"models:/{NAME}@enrolled"))
    assert downloaded.gallery.class_names == ["digit 0", "digit 1", "digit 2", "digit 7"]
    image = next((new_class / "digit 7").iterdir())
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@enrolled").predict(pd.DataFrame({"image": [encode_image(image)]}))
    assert served["label"].tolist() == ["digit 7"]

    more, _ = make_digits_dataset(tmp_path / "more", classes=1, train_per_class=2, test_per_class=0)
    cli = CliRunner().invoke(app, ["enroll", str(more), "--model", f"models:/{NAME}@enrolled", "--promote"])
    assert cli.exit_code == 0, cli.output
    assert "version 3 (champion), enrolled from version 2" in cli.output
    assert client.get_registered_model(NAME).aliases == {"champion": 3, "enrolled": 2, "previous": 1}
    promoted = json.loads(registry.download_bundle(f"models:/{NAME}@champion").joinpath("metadata.json").read_text())
    assert promoted["gallery_size"] == downloaded.metadata["gallery_size"] + 2
    assert promoted["enrolled_from"] == f"{NAME}/2"

    wrong = CliRunner().invoke(app, ["enroll", str(more), "--model", f"models:/{NAME}/1", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "--out is for a bundle folder" in wrong.output


def test_two_enrolments_into_one_bundle_at_once_both_land(bundle, tmp_path):
    """Two 'siamese enroll' processes on one bundle folder: the second waits for the first, then enrols into
    its result, so neither class is lost (each process loads, enrols and saves under the bundle's lock)."""
    import shutil
    import subprocess
    import sys

    target = shutil.copytree(bundle.path, tmp_path / "shared-bundle")
    folders = [make_digits_dataset(tmp_path / f"new{digit}", classes=1, train_per_class=3, test_per_class=0,
                                   first=digit)[0] for digit in (7, 8)]
    command = [sys.executable, "-m", "pipelines.cli", "enroll"]
    runs = [subprocess.Popen([*command, str(folder), "--model", str(target)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            for folder in folders]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
    classes = SiameseRecognizer.load(target).gallery.class_names
    assert {"digit 7", "digit 8"} <= set(classes) and len(classes) == 5


@pytest.mark.parametrize("command", ["enroll", "predict"])
def test_enroll_and_predict_gallery_check_the_folder_as_train_does(bundle, tmp_path, command):
    """A class folder whose name is not UTF-8, and a class named 'unknown': refused by name in one error,
    with nothing enrolled (enroll used to skip the first silently; predict --gallery took the second)."""
    import shutil

    target = shutil.copytree(bundle.path, tmp_path / "copy")
    folder, _ = make_digits_dataset(tmp_path / "new", classes=2, train_per_class=2, test_per_class=0, first=7)
    shutil.copytree(folder / "digit 7", folder / "unknown")
    os.mkdir(os.fsencode(folder) + b"/caf\xe9")
    shutil.copy(sorted((folder / "digit 8").iterdir())[0], os.fsencode(folder) + b"/caf\xe9/a.png")
    before = (target / "gallery.npz").read_bytes()
    image = str(sorted((folder / "digit 8").iterdir())[0])
    args = ([command, str(folder), "--model", str(target)] if command == "enroll"
            else [command, image, "--model", str(target), "--gallery", str(folder)])
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1 and "bad_name" in out.output and "reserved_name" in out.output, out.output
    assert "caf\\xe9" in out.output and "Traceback" not in out.output
    assert (target / "gallery.npz").read_bytes() == before


def test_enrol_with_promote_goes_through_the_rollout(bundle, new_class, monkeypatch, tmp_path):
    """`enroll --promote` while a canary is live is refused in one line, before anything is enrolled, whatever mode
    params.yaml sets; with register.rollout canary and no live rollout the enrolled version becomes the challenger of
    a new rollout, not the champion."""
    import yaml

    from pipelines import rollout

    use_sqlite_store(monkeypatch, tmp_path)
    canary = pipeline_params(NAME, rollout="canary")
    for top1 in (0.5, 0.9):
        register_bundle(canary, bundle.path, {"top1": top1}, bundle.history, [], {}, score_champion=logged_scorer())
    client = MlflowClient()
    assert client.get_registered_model(NAME).aliases == {"champion": 1, "challenger": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"model_name": NAME, "rollout": "canary"}}))
    enrol = ["enroll", str(new_class), "--model", f"models:/{NAME}@champion", "--promote"]
    for command in ([*enrol, "--params", str(params)], enrol):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
        assert f"not promoted: version 2 of '{NAME}' is live as challenger in a canary rollout" in out.output
        assert "enrol without --promote" in out.output
    assert client.get_registered_model(NAME).aliases == {"champion": 1, "challenger": 2}
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2  # nothing was enrolled

    assert registry.roll_back(NAME, "2", "ended by the test", "test")
    out = CliRunner().invoke(app, [*enrol, "--params", str(params)])
    assert out.exit_code == 0 and "version 3 (challenger), enrolled from version 1" in out.output, out.output
    assert "in canary rollout: `siamese rollout status`" in out.output
    assert client.get_registered_model(NAME).aliases == {"champion": 1, "challenger": 3}
    version = client.get_model_version(NAME, "3")
    assert rollout.live_plan(version) is not None and version.tags["staged.reason"].startswith("enrolled ")
