"""The MLflow run, registry and champion gate, against a real SQLite-backed MLflow per test."""

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines import integrity, registry, scoring, tracking
from pipelines.pyfunc_model import RequestError, ServerError, encode_image
from siamese_core.errors import BundleError

from support.messy import png_claiming
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

TAGS = {"git_commit": "0123abc", "data_hash": "d41d8cd9"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(monkeypatch, tmp_path):
    use_sqlite_store(monkeypatch, tmp_path)
    return tmp_path


def _log(bundle, top1, params=None, artifacts=(), bundle_dir=None):
    metrics = {
        "top1": top1,
        "top5": 1.0,
        "per_class_accuracy": {"digit 0": top1},
        "confusion_matrix": {"labels": ["a"], "matrix": [[1]]},
    }
    return register_bundle(
        params or pipeline_params(), bundle_dir or bundle.path, metrics, bundle.history, list(artifacts), TAGS,
        score_champion=logged_scorer(),
    )


def _aliases(name="tiny-recognizer"):
    return MlflowClient().get_registered_model(name).aliases


def test_first_run_becomes_champion_and_logs_everything(bundle, store):
    report = store / "metrics.json"
    report.write_text("{}")
    result = _log(bundle, 0.5, artifacts=[report])
    assert result["version"] == "1" and result["decision"] == "champion"
    assert result["value"] == 0.5 and result["previous_champion_value"] is None
    assert _aliases() == {"champion": 1}

    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.margin"] == "0.5" and run.data.params["train.epochs"] == "1"
    assert run.data.metrics["top1"] == 0.5 and run.data.metrics["acc_class.digit 0"] == 0.5
    assert "confusion_matrix" not in run.data.metrics
    assert run.data.tags["git_commit"] == "0123abc" and run.data.tags["gate.decision"] == "champion"
    losses = client.get_metric_history(result["run_id"], "loss")
    assert [(m.step, m.value) for m in losses] == list(enumerate(bundle.history["loss"]))
    assert len(client.get_metric_history(result["run_id"], "val_loss")) == len(bundle.history["val_loss"])
    assert [a.path for a in client.list_artifacts(result["run_id"])] == ["metrics.json"]
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    tags = client.get_model_version("tiny-recognizer", "1").tags
    assert tags["gate.decision"] == "champion" and tags["gate.value"] == "0.5"


def test_better_run_moves_champion(bundle, store):
    _log(bundle, 0.5)
    result = _log(bundle, 0.7)
    assert (result["version"], result["decision"], result["previous_champion_value"]) == ("2", "champion", 0.5)
    assert _aliases() == {"champion": 2, "previous": 1}
    assert MlflowClient().get_run(result["run_id"]).data.metrics["previous_champion.top1"] == 0.5


def test_worse_run_becomes_challenger(bundle, store):
    _log(bundle, 0.7)
    result = _log(bundle, 0.6)
    assert (result["version"], result["decision"], result["previous_champion_value"]) == ("2", "challenger", 0.7)
    assert _aliases() == {"champion": 1, "challenger": 2}
    tags = MlflowClient().get_model_version("tiny-recognizer", "2").tags
    assert tags["gate.decision"] == "challenger" and tags["gate.previous_champion_value"] == "0.7"


def test_equal_run_does_not_move_champion(bundle, store):
    _log(bundle, 0.7)
    assert _log(bundle, 0.7)["decision"] == "challenger"
    assert _aliases() == {"champion": 1, "challenger": 2}


def test_the_served_model_answers_unknown_with_its_score_when_rejection_is_on(bundle, store, tmp_path):
    import shutil

    from siamese_core.recognizer import store_threshold

    calibrated = shutil.copytree(bundle.path, tmp_path / "calibrated")
    store_threshold(calibrated, 1e-3, {"score": "nearest", "target_met": True})  # reject_unknown: auto turns it on
    _log(bundle, 0.5, bundle_dir=calibrated)
    image = bundle.gallery_images["digit 1"][0]
    other = bundle.path.parent / "data/test/digit 2"
    out = registry.load_champion("tiny-recognizer").predict(
        pd.DataFrame({"image": [encode_image(image), encode_image(sorted(other.iterdir())[0])]}))
    assert out["label"][0] == "digit 1" and out["unknown_score"][0] < 1e-3  # a gallery image: known
    assert out["label"][1] == "unknown" and out["unknown_score"][1] > 1e-3 and out["distance"][1] > 1e-3
    assert out["top_k"][1][0]["label"].startswith("digit")  # its nearest classes are kept


def test_a_model_that_does_not_beat_its_baselines_never_becomes_champion(bundle, store):
    sentence = "The trained model does not beat its baselines on its own test split (top-1 0.7860 against raw pixels 0.9570)"
    result = register_bundle(pipeline_params(), bundle.path, {"top1": 0.786}, bundle.history, [], TAGS,
                                       score_champion=logged_scorer(), baselines={"passed": False, "sentence": sentence})
    assert result["decision"] == "challenger" and result["reason"] == sentence  # even with no champion at all
    assert _aliases() == {"challenger": 1}
    tags = MlflowClient().get_model_version("tiny-recognizer", "1").tags
    assert tags["gate.reason"] == sentence and tags["gate.decision"] == "challenger"


def test_the_champion_is_scored_on_this_runs_queries_and_one_of_other_classes_is_replaced(bundle, store, tmp_path):
    from siamese_core.data import scan_folder
    from siamese_core.evaluation import evaluate
    from siamese_core.recognizer import SiameseRecognizer

    from support.images import make_digits_dataset

    _log(bundle, 0.5)
    champion = registry.alias_version("tiny-recognizer")
    train_dir, test_dir = bundle.path.parent / "data/train", bundle.path.parent / "data/test"
    on_same_queries = scoring.same_queries_scorer(bundle.path, train_dir, test_dir, "map_at_r")(champion).champion
    recognizer = SiameseRecognizer.load(bundle.path).with_gallery(scan_folder(train_dir))
    assert on_same_queries == pytest.approx(evaluate(recognizer, test_dir).map_at_r)
    assert on_same_queries != 0.5  # measured, not read from the champion's run

    other_train, other_test = make_digits_dataset(tmp_path / "other", classes=3, first=5)
    assert scoring.same_queries_scorer(bundle.path, other_train, other_test, "top1")(champion) is None
    result = register_bundle(
        pipeline_params(), bundle.path, {"top1": 0.1}, bundle.history, [], TAGS,
        score_champion=scoring.same_queries_scorer(bundle.path, other_train, other_test, "top1"),
        baselines={"passed": True, "sentence": "beats both"})
    assert result["decision"] == "champion" and "serves other classes" in result["reason"]
    assert result["previous_champion_value"] is None  # figures from other data are never compared
    assert _aliases() == {"champion": 2, "previous": 1}


def test_lower_is_better_metric(bundle, store):
    params = pipeline_params(metric="top1", greater_is_better=False)
    _log(bundle, 0.7, params)
    assert _log(bundle, 0.6, params)["decision"] == "champion"
    assert _log(bundle, 0.9, params)["decision"] == "challenger"


@pytest.mark.parametrize("broken", ["missing bundle", "empty bundle", "missing artifact"])
def test_failed_run_moves_no_alias(bundle, store, broken):
    _log(bundle, 0.5)
    (store / "empty bundle").mkdir()
    broken_args = {
        "missing bundle": {"bundle_dir": store / "no-bundle"},
        "empty bundle": {"bundle_dir": store / "empty bundle"},
        "missing artifact": {"artifacts": [store / "no-such-file.json"]},
    }[broken]
    with pytest.raises((FileNotFoundError, BundleError)):
        _log(bundle, 0.9, **broken_args)
    assert _aliases() == {"champion": 1}
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='tiny-recognizer'")] == ["1"]
    failed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FAILED'")
    assert len(failed) == 1 and mlflow.active_run() is None


def test_missing_gate_metric_is_refused_before_logging(bundle, store):
    with pytest.raises(ValueError, match="register.metric 'recall'"):
        _log(bundle, 0.5, pipeline_params(metric="recall"))


def test_metric_values_flatten_numeric_dicts_and_skip_the_rest():
    values = tracking.metric_values(
        {
            "top1": 0.5,
            "n_queries": 9,
            "flag": True,
            "per_class_accuracy": {"digit 0": 1.0, "a/b": 0.5, "..": 0.1, "猫": 0.0},
            "confusion_matrix": {"labels": ["a"], "matrix": [[1]]},
        }
    )
    assert values == {"top1": 0.5, "n_queries": 9.0, "acc_class.digit 0": 1.0, "acc_class...": 0.1, "acc_class.猫": 0.0}


def test_load_champion_recognises_a_gallery_image(bundle, store):
    _log(bundle, 0.5)
    model = registry.load_champion("tiny-recognizer")
    label = "digit 1"
    image = bundle.gallery_images[label][0]
    out = model.predict(pd.DataFrame({"image": [encode_image(image), encode_image(Path(image).read_bytes())]}))
    assert list(out.columns) == ["label", "distance", "top_k"]  # no threshold: no rejection, no unknown score
    assert out["label"].tolist() == [label, label]
    assert out["distance"].max() < 1e-4
    top_k = out["top_k"][0]
    assert top_k[0]["label"] == label and {"label", "distance"} == set(top_k[0])
    assert model.unwrap_python_model().predict(None, [encode_image(image)])["label"].tolist() == [label]


def test_champion_rejects_paths_non_images_and_oversized_requests(bundle, store, monkeypatch):
    _log(bundle, 0.5)
    model = registry.load_champion("tiny-recognizer")
    good = encode_image(bundle.gallery_images["digit 0"][0])

    def refused(images, error=RequestError):
        with pytest.raises(error) as caught:
            model.predict(pd.DataFrame({"image": images}))
        assert "\n" not in caught.value.message and "Traceback" not in caught.value.serialize_as_json()
        return caught.value

    assert refused([good, "/etc/passwd"]).message == ("row 1: 'image' is not valid base64; send the image bytes "
                                                      "base64-encoded, not a path or URL")
    assert refused([encode_image(b"just some text")]).message == "row 0: not a readable image"
    assert refused([good] * 65).message.startswith("65 images in one request, over the limit of 64")
    huge = refused([good, encode_image(png_claiming(9000, 9000))])
    assert huge.message.startswith("row 1: refused, image too large (9000x9000 pixels, over the limit of 40000000")
    assert huge.get_http_status_code() == 400
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0")
    assert refused([good, good]).message.startswith("stopped at image 0 of 2: the request ran past its time")
    monkeypatch.setenv("SIAMESE_MAX_REQUEST_ROWS", "many")
    failed = refused([good], ServerError)
    assert failed.get_http_status_code() == 500 and "server log" in failed.message


def test_load_champion_without_champion_raises_lookup_error(store):
    with pytest.raises(LookupError, match="'no-such-model'.*run the training pipeline"):
        registry.load_champion("no-such-model")
    MlflowClient().create_registered_model("empty-model")
    with pytest.raises(LookupError, match="'empty-model'"):
        registry.load_champion("empty-model")
    assert registry.champion_uri("m") == "models:/m@champion"


def test_default_store_is_sqlite_next_to_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    try:
        experiment_id = tracking.ensure_experiment("default-store")
        assert tracking.ensure_experiment("default-store") == experiment_id
        location = MlflowClient(tracking.tracking_uri()).get_experiment(experiment_id).artifact_location
        assert location == (tmp_path.resolve() / "mlartifacts").as_uri()
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        mlflow.set_tracking_uri(None)


def test_concurrent_gates_leave_the_best_version_champion(store):
    """Two runs deciding at the same moment: whatever the order, the better one ends as champion."""
    import threading

    client = MlflowClient()
    experiment = tracking.ensure_experiment("race")
    client.create_registered_model("race")
    versions, runs = {}, {}
    for value in (0.7, 0.8, 0.95):  # 0.7 is the champion; 0.8 and 0.95 both beat it and finish together
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "top1", value)
        client.set_terminated(run.info.run_id)
        runs[value] = run.info.run_id
        versions[value] = client.create_model_version("race", f"runs:/{run.info.run_id}/model", run.info.run_id).version
    registry.apply_gate(client, runs[0.7], "race", versions[0.7], "top1", 0.7, True, logged_scorer())

    barrier = threading.Barrier(2)
    decisions = {}

    def finish(value):
        barrier.wait()
        decisions[value] = registry.apply_gate(client, runs[value], "race", versions[value], "top1", value, True,
                                               logged_scorer())[0]

    threads = [threading.Thread(target=finish, args=(v,)) for v in (0.8, 0.95)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert decisions[0.95] == "champion"  # 0.8 is champion only if it decided first, then replaced
    assert client.get_registered_model("race").aliases["champion"] == int(versions[0.95])
    assert mlflow.active_run() is None
    assert client.get_run(runs[0.8]).data.tags["gate.previous_champion_value"] in ("0.7", "0.95")


def test_cli_predicts_with_the_registered_champion(bundle, store):
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    image = bundle.gallery_images["digit 1"][0]
    missing = runner.invoke(app, ["predict", str(image), "--model", "models:/tiny-recognizer@champion"])
    assert missing.exit_code == 1 and "no 'champion' version of registered model 'tiny-recognizer'" in missing.output
    _log(bundle, 0.5)
    result = runner.invoke(app, ["predict", str(image), "--model", "models:/tiny-recognizer@champion", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["label"] == "digit 1"


def test_gate_keeps_the_replaced_champion_as_previous_and_the_cli_rolls_back_and_promotes_with_a_reason(bundle, store):
    from typer.testing import CliRunner

    from pipelines.cli import app

    _log(bundle, 0.5)
    _log(bundle, 0.7)
    assert _aliases() == {"champion": 2, "previous": 1}
    client = MlflowClient()
    assert client.get_model_version("tiny-recognizer", "2").tags["gate.reason"].startswith("top1 0.7")

    runner = CliRunner()
    assert runner.invoke(app, ["rollback", "tiny-recognizer"]).exit_code == 2, "a reason is required"
    done = runner.invoke(app, ["rollback", "tiny-recognizer", "--reason", "v2 misreads scanned forms"])
    assert done.exit_code == 0, done.output
    assert "rolled back to version 1" in done.output
    assert _aliases() == {"champion": 1, "previous": 2}
    restored, demoted = (client.get_model_version("tiny-recognizer", v).tags for v in ("1", "2"))
    assert restored["rollback.reason"] == "v2 misreads scanned forms" and restored["rollback.by"] and restored["rollback.at"]
    assert demoted["demoted.reason"] == "rollback of version 1: v2 misreads scanned forms"

    done = runner.invoke(app, ["promote", "tiny-recognizer", "2", "--reason", "retrained scanner fixed"])
    assert done.exit_code == 0, done.output
    assert _aliases() == {"champion": 2, "previous": 1}
    assert client.get_model_version("tiny-recognizer", "2").tags["promote.reason"] == "retrained scanner fixed"
    again = runner.invoke(app, ["promote", "tiny-recognizer", "2", "--reason", "again"])
    assert again.exit_code == 1 and "already the champion" in again.output
    padded = runner.invoke(app, ["promote", "tiny-recognizer", "02", "--reason", "the same version, written 02"])
    assert padded.exit_code == 1 and "already the champion" in padded.output  # 'previous' is not overwritten
    for bad in ("1" * 23, "two", "0"):
        refused = runner.invoke(app, ["promote", "tiny-recognizer", bad, "--reason", "typo"])
        assert refused.exit_code == 1 and "positive whole number" in refused.output and "Traceback" not in refused.output
    missing = runner.invoke(app, ["promote", "tiny-recognizer", "9", "--reason", "typo"])
    assert missing.exit_code == 1 and "no version 9" in missing.output
    assert _aliases() == {"champion": 2, "previous": 1}


def test_model_card_shows_data_metrics_beside_baselines_threshold_and_changed_params():
    from pipelines.card import model_card
    from siamese_core.evaluation_report import BaselineCheck, Calibration, EvaluationReport

    metrics = {"top1": 0.9, "baseline_raw_pixels.top1": 0.5, "baseline_untrained.top1": 0.25,
               "fewshot.1shot.mean": 0.8, "baseline_raw_pixels.fewshot.1shot.mean": 0.4, "calibration.threshold": 0.7,
               "calibration.known_accepted": 0.9, "calibration.unknown_rejected": 0.85}
    data = {"train": {"path": "data/demo/train", "md5": "0123abcd.dir", "classes": 40, "images": 560}}
    evaluation = EvaluationReport.model_construct(
        baseline_check=BaselineCheck(passed=True, margin=0.0, sentence="The trained model beats both baselines."),
        calibration=Calibration.model_construct(score="class_mean", target_met=True))
    card = model_card(pipeline_params(), metrics, data, {"MLflow run": "demo-run (abc)"}, "3", "champion", 0.85,
                      "top1 0.9000 against champion version 2's 0.8500 on the same test queries", evaluation)
    assert card.startswith("# tiny-recognizer version 3")
    assert "**Gate:** champion on `top1` = 0.9000 (champion before, on the same queries: 0.8500)" in card
    assert "**Baselines:** The trained model beats both baselines." in card
    # tables are aligned text blocks: MLflow's page shows bare Markdown tables with no space between cells
    assert card.count("```text") == 3
    assert re.search(r"^train\s+data/demo/train\s+0123abcd\.dir\s+40\s+560$", card, re.M)
    assert re.search(r"^top1\s+0\.9000\s+0\.5000\s+0\.2500$", card, re.M)
    assert re.search(r"^fewshot\.1shot\.mean\s+0\.8000\s+0\.4000\s+-$", card, re.M)
    assert "Unknown score `class_mean` above 0.7000 answers `unknown`" in card and "rejection is on" in card
    assert re.search(r"^model\.backbone\s+small_cnn\s+resnet50$", card, re.M)
    assert "## Intended use" in card and "## Limits" in card and "- MLflow run: `demo-run (abc)`" in card


def test_two_processes_creating_a_new_store_at_once_both_succeed(tmp_path):
    import os
    import subprocess
    import sys

    code = "from pipelines import tracking; print(tracking.ensure_experiment('first-ever'))"
    for attempt in range(3):  # each round starts from a brand-new database
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / f'new-{attempt}.db'}"}
        processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in processes]
        assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
        assert outputs[0][0].split()[-1] == outputs[1][0].split()[-1], "both found the same experiment"


def test_a_model_whose_artifacts_are_gone_is_one_line(bundle, store):
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    _log(bundle, 0.5)
    shutil.rmtree(store / "mlartifacts")  # the artifact store lost the objects the registry points at
    image = bundle.gallery_images["digit 1"][0]
    out = CliRunner().invoke(app, ["predict", image, "--model", "models:/tiny-recognizer@champion"])
    assert out.exit_code == 1 and "its artifacts could not be downloaded" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


def test_a_registration_killed_midway_is_found_and_marked(bundle, store):
    """A version created by a registration that was killed before the gate (no decision, its run RUNNING):
    `siamese registry repair` tags it incomplete and ends its run FAILED; decided versions are left alone."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    decided = _log(bundle, 0.5)
    client = MlflowClient()
    run = client.create_run(tracking.ensure_experiment("siamese"))
    killed = client.create_model_version("tiny-recognizer", f"runs:/{run.info.run_id}/model", run.info.run_id).version
    assert registry.repair("tiny-recognizer") == []  # too young: it may still be registering
    out = CliRunner().invoke(app, ["registry", "repair", "tiny-recognizer", "--older-than", "0"])
    assert out.exit_code == 0 and f"marked 1 incomplete version(s): {killed}" in out.output
    assert client.get_model_version("tiny-recognizer", str(killed)).tags["registration"] == "incomplete"
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert "registration" not in client.get_model_version("tiny-recognizer", decided["version"]).tags
    assert _aliases() == {"champion": 1}


def test_a_version_is_stored_as_code_and_a_swapped_artifact_is_refused_before_it_runs(bundle, store, tmp_path):
    """No pickle is stored; each registered file is covered by the sha256 kept on the version, so code
    written into the artifact store is refused in one line and never executed."""
    _log(bundle, 0.5)
    stored = {p.relative_to(store / "mlartifacts").as_posix(): p for p in (store / "mlartifacts").rglob("*") if p.is_file()}
    assert not [name for name in stored if name.endswith((".pkl", ".pickle"))]
    assert registry.load_champion("tiny-recognizer") is not None  # untouched: loads

    marker = tmp_path / "executed"
    code = next(p for name, p in stored.items() if name.endswith("/served_model.py"))
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    for load in (lambda: registry.load_champion("tiny-recognizer"),
                 lambda: registry.download_bundle("models:/tiny-recognizer/1")):
        with pytest.raises(registry.RegistryError, match="differ from those registered") as error:
            load()
        assert len(str(error.value).splitlines()) == 1
    assert not marker.exists()

    config = next(p for name, p in stored.items() if name.endswith("/bundle/config.json"))
    code.write_text(code.read_text().split("\n", 1)[1])  # the code restored; now the bundle's data changes
    registry.load_champion("tiny-recognizer")
    config.write_text(config.read_text().replace('"margin"', '"margin" ', 1))
    with pytest.raises(registry.RegistryError, match="differ from those registered"):
        registry.download_bundle("models:/tiny-recognizer@champion")

    config.write_text(config.read_text().replace('"margin" ', '"margin"', 1))  # restored


def test_a_version_registered_before_digests_is_read_as_data_and_served_only_once_signed(bundle, store):
    from typer.testing import CliRunner

    from pipelines.cli import app

    _log(bundle, 0.5)
    MlflowClient().delete_model_version_tag("tiny-recognizer", "1", integrity.ARTIFACTS_DIGEST_TAG)
    with pytest.raises(registry.RegistryError, match="siamese registry sign tiny-recognizer 1"):
        registry.load_champion("tiny-recognizer")  # its code would run: refused
    assert (registry.download_bundle("models:/tiny-recognizer@champion") / "config.json").is_file()  # data: read
    out = CliRunner().invoke(app, ["registry", "sign", "tiny-recognizer", "1"])
    assert out.exit_code == 0 and "artifacts_sha256" in out.output
    assert registry.load_champion("tiny-recognizer") is not None
    again = CliRunner().invoke(app, ["registry", "sign", "tiny-recognizer", "1"])
    assert again.exit_code == 1 and "already has its digest" in again.output


def _stored(name: str, version: str) -> Path:
    """Where the artifact store keeps the files of a version."""
    from urllib.parse import urlparse

    client = MlflowClient()
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    return Path(urlparse(client.get_logged_model(model_id).artifact_location).path)


@pytest.fixture
def private_tmp(monkeypatch, tmp_path):
    """A temporary folder of this test's own, where the registry's downloads go, so they can be counted."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _downloads(folder: Path) -> list[Path]:
    return sorted(folder.glob("siamese-model-*"))


def _tamper(name: str, version: str) -> Path:
    config = _stored(name, version) / "artifacts" / "bundle" / "config.json"
    config.write_text(config.read_text().replace('"margin"', '"margin" ', 1))
    return config


def test_a_promote_to_a_tampered_version_is_refused_at_promote_time_and_the_alias_stays(bundle, store, private_tmp):
    from typer.testing import CliRunner

    from pipelines.cli import app

    _log(bundle, 0.5)
    assert _log(bundle, 0.4)["decision"] == "challenger"
    assert _downloads(private_tmp) == []  # registering and scoring left no download behind
    _tamper("tiny-recognizer", "2")
    for command in (["promote", "tiny-recognizer", "2", "--reason", "tampered"],
                    ["promote", "tiny-recognizer", "2", "--reason", "tampered", "--force"]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
        assert "not promoted: models:/tiny-recognizer/2: the artifacts of version 2 differ from those registered" in out.output
    assert _aliases() == {"champion": 1, "challenger": 2}
    assert "promote.reason" not in MlflowClient().get_model_version("tiny-recognizer", "2").tags
    assert _downloads(private_tmp) == []


def test_a_server_removes_every_download_and_backs_off_a_tampered_champion(bundle, store, private_tmp, monkeypatch,
                                                                              caplog):
    """The champion alias moved to a tampered version (as promote allowed before it checked): each check of the
    server fails to load it, leaves no download behind, and is tried less and less often, with one warning."""
    import logging

    from pipelines import serving

    _log(bundle, 0.5)
    _log(bundle, 0.4)
    served = serving.Served("models:/tiny-recognizer@champion", reload_seconds=0)
    assert served.current.version == "1" and _downloads(private_tmp) == []  # loaded: its download is gone
    config = _tamper("tiny-recognizer", "2")
    MlflowClient().set_registered_model_alias("tiny-recognizer", "champion", "2")
    attempts = []
    download = integrity.download
    monkeypatch.setattr(integrity, "download", lambda uri: attempts.append(uri) or download(uri))
    now = [0.0]
    served._retries.clock = lambda: now[0]
    with caplog.at_level(logging.WARNING, logger="pipelines.serving"):
        for second in range(40):  # 40 checks, a second apart
            now[0] = float(second)
            served.check()
    assert served.current.version == "1" and _downloads(private_tmp) == []
    assert len(attempts) == 6  # at 0, 1, 3, 7, 15 and 31 s
    warned = [r.getMessage() for r in caplog.records if "version 2 could not be loaded" in r.getMessage()]
    assert len(warned) == 1 and "differ from those registered" in warned[0] and "still serving version 1" in warned[0]

    config.write_text(config.read_text().replace('"margin" ', '"margin"', 1))  # the store repaired
    now[0] = 63.0
    served.check()
    assert served.current.version == "2" and _downloads(private_tmp) == []


def test_a_version_with_an_ondisk_index_keeps_its_download_while_it_is_loaded(store, private_tmp, tmp_path):
    import gc

    from siamese_core.data import scan_folder
    from siamese_core.model import build_embedding_model
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    from support.images import make_digits_dataset
    from support.models import make_tiny_bundle
    from support.tiny import tiny_config

    train_dir, _ = make_digits_dataset(tmp_path / "digits", classes=10, train_per_class=30, test_per_class=0)
    config = tiny_config(embedding_dim=32, ondisk_min_rows=0)  # any size gets the on-disk index
    network = build_embedding_model(config.model)
    ondisk = SiameseRecognizer(network, build_gallery(network, scan_folder(train_dir)), config).save(tmp_path / "bundle")
    tiny = make_tiny_bundle(tmp_path / "tiny")
    _log(tiny, 0.5, bundle_dir=ondisk)
    assert _downloads(private_tmp) == []
    model = registry.load_champion("tiny-recognizer")
    assert len(_downloads(private_tmp)) == 1  # its gallery's index is read from there while it answers
    image = encode_image(sorted((train_dir / "digit 4").iterdir())[0])
    assert model.predict(pd.DataFrame({"image": [image]}))["label"].tolist() == ["digit 4"]
    del model
    gc.collect()
    assert _downloads(private_tmp) == []
