"""Erasure on the embedded default (SQLite MLflow, local folders, a DVC repository with a local remote): a champion
that knows a class, traffic that includes it, then `siamese erase`; afterwards nothing in any place yields the class's
images (by the sha256 of each) or its name, outside the audit record, and the champion answers the others unchanged."""

import hashlib
import json
import re
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
from pipelines.pyfunc_model import encode_image
from siamese_core.config import apply_overrides
from siamese_core.recognizer import SiameseRecognizer

from support.models import make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

NAME, ERASED = "tiny-erasure", "digit 2"
PLACES = {"training data": "data", "dvc cache": ".dvc/cache", "dvc remote": "remote", "tracking store": "mlartifacts",
          "inference log": "logs", "review queue": "review", "stage cache": ".siamese-cache",
          "run workspaces": "runs", "tracking database": "mlflow.db"}


def sh(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


def found(root: Path, digests: set[str], audit: str | None = None) -> dict[str, int]:
    """Files per place whose sha256 is one of ``digests`` or whose bytes name the class (UTF-8 or UTF-32)."""
    name = re.compile(rb"(?<![\w])" + re.escape(ERASED.encode()) + rb"(?![\w])")
    wide = ERASED.encode("utf-32-le")
    hits = {}
    for place, folder in PLACES.items():
        count = 0
        for path in [root / folder] if (root / folder).is_file() else (root / folder).rglob("*"):
            if not path.is_file() or (audit and audit in str(path)):
                continue
            data = path.read_bytes()
            digest_text = any(d.encode() in data for d in digests)
            count += (hashlib.sha256(data).hexdigest() in digests or bool(name.search(data)) or wide in data
                      or digest_text or ERASED in path.relative_to(root).parts)
        hits[place] = count
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
    register_bundle(params, tiny.path, {"top1": 0.5},
                    tiny.history, [report], {"git_commit": "x"}, score_champion=lambda champion: None)

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

    others = [p for label, paths in tiny.gallery_images.items() if label != ERASED for p in paths]
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [encode_image(p) for p in others]}))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "data").rglob(f"{ERASED}/*.png")}
    before = found(tmp_path, digests)
    assert all(before.values()), before

    dry = CliRunner().invoke(app, ["erase", "--class", ERASED, "--reason", "request 17", "--dry-run", "--json",
                                   "--params", "params.yaml"])
    assert dry.exit_code == 0, dry.output
    assert found(tmp_path, digests) == before  # a dry run changes nothing
    listed = json.loads(dry.stdout.strip().splitlines()[0])["places"]
    assert listed["registered versions"] == [f"{NAME}/1"] and listed["dvc remote"] and listed["inference log"]

    done = CliRunner().invoke(app, ["erase", "--class", ERASED, "--reason", "request 17", "--json",
                                    "--params", "params.yaml"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[0])
    after = found(tmp_path, digests, result["audit_run"])
    print("places checked, files found before -> after:",
          {place: f"{before[place]} -> {after[place]}" for place in PLACES})
    assert not any(count for place, count in after.items() if place != "tracking database"), after
    # Known limit: MLflow keeps a run's dataset inputs (their profile: images per class, no image, no digest) with no
    # API to delete them; they are the only rows of the tracking database that still name the class.
    rows = subprocess.run(["sqlite3", str(tmp_path / "mlflow.db"), ".dump"], capture_output=True, text=True).stdout
    assert not any(d in rows for d in digests)
    assert {line.split()[2] for line in rows.splitlines() if ERASED in line} == {"datasets"}

    audit = mlflow.MlflowClient().download_artifacts(result["audit_run"], "erasure.json", str(tmp_path / "audit"))
    record = json.loads(Path(audit).read_text())
    assert record["class"] == ERASED and set(record["digests"]) >= digests and record["reason"] == "request 17"
    assert result["new_version"] == "2"
    now = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [encode_image(p) for p in others]}))
    assert now["label"].tolist() == served["label"].tolist()
    assert now["distance"].tolist() == pytest.approx(served["distance"].tolist(), abs=1e-6)
    with pytest.raises(RegistryError):  # the old champion cannot be loaded any more
        registry.load_version(f"models:/{NAME}/1")
