"""Erasure on the embedded default (SQLite MLflow, local folders, a DVC repository with a local remote): a champion
that knows a class, traffic that includes it, then `siamese erase`; afterwards nothing in any place yields the class's
images (by the sha256 of each) or its name, outside the audit record, and the champion answers the others unchanged.
With a real Label Studio (slow), the review project's tasks that show or name the class go too. The same on the
shared stack: tests/test_erasure_stack.py."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines import registry
from pipelines.cli import app
from pipelines.errors import RegistryError
from pipelines.inference_log import judged, open_log
from pipelines.labelstudio import LabelStudio, push_review
from pipelines.pyfunc_model import encode_image
from siamese_core.config import apply_overrides
from siamese_core.recognizer import SiameseRecognizer

from support.erasure_search import Search, log_old_dataset_input
from support.messy import noise, write
from support.models import make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

NAME, ERASED = "tiny-erasure", "digit 2"
FOLDERS = {"training data": "data", "pipeline outputs": "artifacts", "dvc cache": ".dvc/cache",
           "dvc remote": "remote", "tracking artifacts": "mlartifacts", "inference log": "logs",
           "review queue": "review", "stage cache": ".siamese-cache", "run workspaces": "runs"}


def sh(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


def found(root: Path, search: Search, answers, audit: str | None = None) -> dict[str, int]:
    """Per place: files (or, for the database, rows; for the champion, answers) that yield the class."""
    hits = {place: search.files(root / folder, audit) for place, folder in FOLDERS.items()}
    hits["dvc state"] = search.dvc_state(root)
    hits["tracking database rows"] = sum(search.rows(f"sqlite:///{root / 'mlflow.db'}").values())
    hits["champion answers"] = sum(search.yields(json.dumps(answer, default=str).encode()) for answer in answers())
    return hits


@pytest.mark.timeout(900)
def test_erase_a_class_everywhere_and_the_champion_serves_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    use_sqlite_store(monkeypatch, tmp_path)
    tiny = make_tiny_bundle(tmp_path)  # data/train, data/test and bundle/ under tmp_path
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=tmp_path)
    sh("dvc", "add", "-q", "data", cwd=tmp_path)
    sh("dvc", "push", "-q", cwd=tmp_path)
    params = apply_overrides(pipeline_params(NAME), {
        "data.train_dir": "data/train", "data.test_dir": "data/test", "monitoring.log_uri": "logs",
        "monitoring.review_dir": "review", "monitoring.log_images": True, "monitoring.log_embeddings": True,
        "monitoring.review_margin": 1e9, "monitoring.flush_seconds": 0.1})
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    report = tmp_path / "confusion.csv"
    report.write_text("class,digit 0,digit 1,digit 2\n" + "\n".join(f"{c},1,0,0" for c in tiny.gallery_images))
    registered = register_bundle(params, tiny.path, {"top1": 0.5, "per_class_accuracy": {c: 0.5 for c in tiny.gallery_images}},
                                 tiny.history, [report], {"git_commit": "x"}, score_champion=lambda champion: None)
    log_old_dataset_input(registered["run_id"], {"digit 0": 9, "digit 1": 9, ERASED: 9})
    shutil.copytree(tiny.path, tmp_path / "artifacts" / "bundle")  # as `dvc repro` leaves the pipeline's outputs

    recognizer = SiameseRecognizer.load(tiny.path)  # traffic of every class, logged with images and embeddings
    traffic = [p for paths in tiny.gallery_images.values() for p in paths[:3]]
    log = open_log(params.monitoring, registry.model_identity(f"models:/{NAME}@champion"), "cli")
    queries = recognizer.embed(traffic)
    matches = recognizer.match(queries)
    log.submit([Path(p).read_bytes() for p in traffic], matches, judged(recognizer, queries, matches), queries, 5.0)
    log.close()
    embed_cache = tmp_path / ".siamese-cache" / "stages" / "embed" / "k1"
    embed_cache.mkdir(parents=True)
    shutil.copy(tiny.path / "gallery.npz", embed_cache)
    shutil.copytree(tmp_path / "data", tmp_path / "runs" / "20260101-000000-train" / "data")

    of_the_class = [encode_image(p) for p in tiny.gallery_images[ERASED]]  # read before they go

    def answers(images: list[str] = of_the_class) -> list[dict]:
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        return served.predict(pd.DataFrame({"image": images})).to_dict("records")

    others = [encode_image(p) for label, paths in tiny.gallery_images.items() if label != ERASED for p in paths]
    served = answers(others)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "data").rglob(f"{ERASED}/*.png")}
    search = Search(ERASED, digests)
    before = found(tmp_path, search, answers)
    assert all(before.values()), before

    dry = CliRunner().invoke(app, ["erase", "--class", ERASED, "--reason", "request 17", "--dry-run", "--json",
                                   "--params", "params.yaml"])
    assert dry.exit_code == 0, dry.output
    assert found(tmp_path, search, answers) == before  # a dry run changes nothing
    listed = json.loads(dry.stdout.strip().splitlines()[0])["places"]
    assert listed["registered versions"] == [f"{NAME}/1"] and listed["dvc remote"] and listed["inference log"]
    assert {row.split()[0] for row in listed["tracking database"]} == {
        "datasets.dataset_profile", "metrics.key", "latest_metrics.key", "logged_model_metrics.metric_name"}
    datasets = [row for row in listed["tracking database"] if row.startswith("datasets.")]
    assert len(datasets) == 1 and "data-train-before" in datasets[0], "a run logged now names no class in its data"

    done = CliRunner().invoke(app, ["erase", "--class", ERASED, "--reason", "request 17", "--json",
                                    "--params", "params.yaml"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[0])
    after = found(tmp_path, search, answers, result["audit_run"])
    print("\nplaces checked, found before -> after (embedded default):\n" + "\n".join(
        f"| {place} | {before[place]} -> {after[place]} |" for place in before))
    assert not any(after.values()), after
    assert not list((tmp_path / "data").rglob(ERASED)), "an empty folder named after the class is left"

    audit = mlflow.MlflowClient().download_artifacts(result["audit_run"], "erasure.json", str(tmp_path / "audit"))
    record = json.loads(Path(audit).read_text())
    assert record["class"] == ERASED and set(record["digests"]) >= digests and record["reason"] == "request 17"
    assert mlflow.get_run(result["audit_run"]).info.status == "FINISHED"  # ended by the one lifecycle
    rewritten = json.loads(Path(mlflow.MlflowClient().download_artifacts(
        result["audit_run"], "places.json", str(tmp_path / "audit"))).read_text())["places"]["tracking database"]
    assert any(row.startswith("datasets.dataset_profile") and "data-train-before" in row for row in rewritten)
    [profile] = [json.loads(i.dataset.profile) for i in mlflow.get_run(registered["run_id"]).inputs.dataset_inputs
                 if i.dataset.name == "data-train-before"]
    assert profile["per_class"] == {"digit 0": 9, "digit 1": 9}, "the other classes' counts are kept"
    assert result["new_version"] == "2"
    now = answers(others)
    assert [a["label"] for a in now] == [a["label"] for a in served]
    assert [a["distance"] for a in now] == pytest.approx([a["distance"] for a in served], abs=1e-6)
    with pytest.raises(RegistryError):  # the old champion cannot be loaded any more
        registry.load_version(f"models:/{NAME}/1")


def _pending(review: Path, name: str, image, top_k: list[str]) -> str:
    """A review item as the server leaves it: the image and its sidecar (what the model answered); its sha256."""
    path = write(review / "pending" / top_k[0] / f"{name}.png", image)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({
        "request_id": name, "sha256": digest, "model_version": "1", "decision": "unknown", "unknown_score": 0.8,
        "top_k": [{"label": label, "distance": 0.5 + i / 10} for i, label in enumerate(top_k)]}))
    return digest


@pytest.mark.slow  # Label Studio's first start migrates its database: about a minute
def test_erase_deletes_the_label_studio_tasks_that_show_or_name_the_class(tmp_path, monkeypatch):
    """Tasks showing one of the class's images, naming it in the model's answer, or labelled with it by a person are
    listed by --dry-run and deleted by the erasure, with the review items they show and the class's choice; a task of
    another class stays as it was."""
    from support.labelstudio import TOKEN, running_label_studio

    monkeypatch.chdir(tmp_path)
    use_sqlite_store(monkeypatch, tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    params = apply_overrides(pipeline_params(NAME), {"data.train_dir": "data/train", "data.test_dir": "data/test",
                                                     "monitoring.review_dir": "review"})
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    write(tmp_path / "data" / "train" / ERASED / "a.png", noise(seed=1))
    write(tmp_path / "data" / "train" / "digit 1" / "b.png", noise(seed=2))
    review = tmp_path / "review"
    shown = _pending(review, "of-the-class", noise(seed=1), ["digit 1", "digit 0"])  # its image is the class's
    _pending(review, "other", noise(seed=3), ["digit 1", "digit 0"])
    labelled = _pending(review, "labelled-as-the-class", noise(seed=4), ["digit 0", "digit 1"])
    _pending(review, "named", noise(seed=5), ["digit 1", ERASED])
    with running_label_studio(tmp_path) as url:
        studio = LabelStudio(url)
        sent = push_review(review, studio)
        assert sent["sent"] == 4 and ERASED in sent["classes"]
        [task] = [t for t in studio.tasks(sent["project"]) if t["data"]["sha256"] == labelled]
        studio.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": [
            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [ERASED]}}]})
        before = {t["data"]["file"]: t for t in studio.tasks(sent["project"])}

        command = ["erase", "--class", ERASED, "--reason", "request 18", "--json", "--params", "params.yaml",
                   "--label-studio", url]
        dry = CliRunner().invoke(app, [*command, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        listed = json.loads(dry.stdout.strip().splitlines()[0])["places"]
        ids = {str(t["id"]): name for name, t in before.items()}
        assert sorted(ids[item.rsplit("/", 1)[1]] for item in listed["label studio tasks"]) == [
            "labelled-as-the-class.png", "named.png", "of-the-class.png"]
        assert len(studio.tasks(sent["project"])) == 4, "a dry run deletes nothing"

        done = CliRunner().invoke(app, command)
        assert done.exit_code == 0, done.output
        [kept] = studio.tasks(sent["project"])
        assert kept == before["other.png"]
        config = studio.call("GET", f"/api/projects/{sent['project']}")["label_config"]
        assert ERASED not in config and "digit 1" in config
    assert sorted(p.name for p in review.rglob("*") if p.is_file()) == ["other.json", "other.png"]
    assert shown not in json.dumps(kept)


def test_an_erasure_through_a_tracking_server_without_its_database_is_refused_in_one_line(tmp_path, monkeypatch):
    """The rows MLflow has no call for are rewritten in the server's database: without it, nothing starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI", raising=False)
    (tmp_path / "params.yaml").write_text(json.dumps(pipeline_params(NAME).model_dump(mode="json")))
    done = CliRunner().invoke(app, ["erase", "--image-digest", "a" * 64, "--reason", "r", "--dry-run"])
    assert done.exit_code != 0
    [line] = done.output.strip().splitlines()
    assert "set $MLFLOW_BACKEND_STORE_URI to its database URI" in line
