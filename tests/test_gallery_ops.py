"""Gallery commands: list, remove and relabel on a bundle folder (rewritten atomically) and on a registered model (a
new version through the gate's checks for a gallery edit, MLflow on SQLite)."""

import hashlib
import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipelines import gallery_ops
from pipelines.cli import app
from pipelines.pyfunc_model import encode_image
from siamese_core.gallery import Gallery
from siamese_core.recognizer import SiameseRecognizer

from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

NAME = "tiny-gallery"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_list_remove_and_relabel_a_bundle_folder(bundle, tmp_path):
    target = shutil.copytree(bundle.path, tmp_path / "bundle")
    listed = cli("gallery", "list", str(target), "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == {name: len(paths) for name, paths in bundle.gallery_images.items()}

    images = json.loads(cli("gallery", "list", str(target), "--images", "--json").output)
    first = bundle.gallery_images["digit 0"][0]
    entry = next(e for e in images if e["path"] == first)
    assert (entry["sha256"], entry["id"]) == (sha(first), sha(first)[:16])  # a stable id, from the source digest

    removed = cli("gallery", "remove", str(target), "--image", entry["id"], "--reason", "mislabelled")
    assert removed.exit_code == 0, removed.output
    assert [e["id"] for e in json.loads(cli("gallery", "list", str(target), "--images", "--json").output)] == [
        e["id"] for e in images if e["id"] != entry["id"]]  # the other ids did not move

    bad = cli("gallery", "relabel", str(target), "--class", "digit 1", "--to", "a/b", "--reason", "x")
    assert bad.exit_code == 1 and "not a fit class name (holds a path separator)" in bad.output
    assert cli("gallery", "relabel", str(target), "--class", "digit 1", "--to", "one", "--reason", "typo").exit_code == 0
    assert cli("gallery", "remove", str(target), "--class", "digit 2", "--reason", "discontinued").exit_code == 0
    missing = cli("gallery", "remove", str(target), "--class", "digit 9", "--reason", "x")
    assert missing.exit_code == 1 and "holds no class digit 9" in missing.output

    recognizer = SiameseRecognizer.load(target)
    assert recognizer.gallery.class_names == ["digit 0", "one"]
    assert len(recognizer.gallery) == len(images) - 1 - len(bundle.gallery_images["digit 2"])
    assert recognizer.predict_one(bundle.gallery_images["digit 1"][0]).label == "one"
    edits = recognizer.metadata["gallery_edits"]
    assert [e["reason"] for e in edits] == ["mislabelled", "typo", "discontinued"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # nothing half-written left beside it


def test_a_gallery_keeps_digests_through_save_load_and_reordering(bundle, tmp_path):
    gallery = Gallery.load(bundle.path / "gallery.npz")
    assert gallery.digests is not None and all(len(d) == 64 for d in gallery.digests)
    shuffled = Gallery(gallery.embeddings[::-1], gallery.labels[::-1], gallery.class_names, gallery.paths[::-1],
                       digests=gallery.digests[::-1])
    assert list(zip(shuffled.paths, shuffled.digests)) != list(zip(gallery.paths, gallery.digests))
    assert sorted(zip(shuffled.paths, shuffled.digests)) == sorted(zip(gallery.paths, gallery.digests))
    assert all(sha(path) == digest for path, digest in zip(shuffled.paths, shuffled.digests))


def test_edits_of_a_registered_model_make_versions_through_the_gate(bundle, monkeypatch, tmp_path):
    use_sqlite_store(monkeypatch, tmp_path)
    register_bundle(pipeline_params(NAME), bundle.path, {"top1": 0.5}, bundle.history, [], {"git_commit": "x"},
                    score_champion=logged_scorer())
    client = MlflowClient()

    removed = cli("gallery", "remove", f"models:/{NAME}@champion", "--class", "digit 2", "--reason", "discontinued")
    assert removed.exit_code == 0, removed.output
    assert "version 2 (champion), from version 1" in removed.output
    card = client.get_model_version(NAME, "2").description
    assert "class digit 2 removed" in card and "**Why:** discontinued" in card and "of version 1" in card
    assert "same-queries comparison with the champion is skipped" in card

    relabel = cli("gallery", "relabel", f"models:/{NAME}/2", "--class", "digit 1", "--to", "one", "--reason", "typo")
    assert relabel.exit_code == 0, relabel.output
    assert "version 3 (champion)" in relabel.output and "not worse" in relabel.output
    assert client.get_registered_model(NAME).aliases == {"champion": 3, "previous": 2}
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [encode_image(bundle.gallery_images["digit 1"][0])]}))
    assert served["label"].tolist() == ["one"]

    old = cli("gallery", "remove", f"models:/{NAME}/1", "--class", "digit 0", "--reason", "x")
    assert old.exit_code == 0, old.output
    assert "version 4 (no alias)" in old.output and "not the champion" in old.output
    assert client.get_registered_model(NAME).aliases["champion"] == 3
    assert gallery_ops.class_counts(gallery_ops.read_gallery(f"models:/{NAME}/4")) == {
        "digit 1": len(bundle.gallery_images["digit 1"]), "digit 2": len(bundle.gallery_images["digit 2"])}


def test_same_queries_figures_see_a_worse_gallery():
    """The gate's comparison for an edit: removing the images that answer a class right makes it worse."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 4, dtype=np.float32) * 10
    rows = np.concatenate([centres[c] + rng.normal(0, 0.1, (5, 4)) for c in range(3)]).astype(np.float32)
    gallery = Gallery(rows, np.repeat(np.arange(3), 5), ["a", "b", "c"], [f"{i}" for i in range(15)])
    keep = np.ones(15, bool)
    keep[[5, 6, 7, 8]] = False  # class b keeps one image: it answers b no more
    before, after, count = gallery_ops.same_queries(gallery, keep, ["a"] * 5 + ["b"] * 5 + ["c"] * 5)
    assert (before, count) == (1.0, 11) and after == pytest.approx(10 / 11)
    assert gallery_ops.edit_decision("1", "1", False, (before, after, count))[0] is False
    assert gallery_ops.edit_decision("1", "1", True, None)[0] is True
    assert gallery_ops.edit_decision("1", "2", False, (1.0, 1.0, 3))[0] is False
