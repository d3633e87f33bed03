"""Batch prediction: the rows are the recogniser's answers, a bad image is a row with its error, a kill -9 midway
then a rerun gives the rows of one clean run, and two Dask workers give the same rows."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.batch_predict import predict_batch
from pipelines.cli import app
from pipelines.registry import model_identity
from siamese_core.recognizer import SiameseRecognizer

from support.images import make_digits_dataset
from support.models import make_tiny_bundle


def assert_same_rows(rows, expected):
    """The same rows in the same order; distances within float rounding (batches of other sizes)."""
    floats = ["distance", "unknown_score", "top_k_distances"]
    assert rows.drop(columns=floats).equals(expected.drop(columns=floats))
    assert rows["distance"].fillna(-1).tolist() == pytest.approx(expected["distance"].fillna(-1).tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """450 digit images in class folders and one file that is not an image."""
    train, _ = make_digits_dataset(tmp_path_factory.mktemp("batch"), classes=3, train_per_class=150, test_per_class=0)
    (train / "digit 1" / "broken.png").write_bytes(b"not a png at all")
    return train


@pytest.fixture(scope="module")
def clean(bundle, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "answers.parquet"
    result = CliRunner().invoke(app, ["predict-batch", str(images), "--out", str(out), "--model", str(bundle.path),
                                      "--shard-size", "40"])
    assert result.exit_code == 0, result.output
    assert "451 images (1 with errors)" in result.output
    return pq.read_table(out).to_pandas()


def test_rows_are_the_recognisers_answers_and_a_bad_image_is_a_row(bundle, clean):
    broken = clean[clean["source"].str.endswith("broken.png")].iloc[0]
    assert "not a readable image" in broken["error"] and pd.isna(broken["label"]) and len(broken["sha256"]) == 64
    good = clean[clean["error"].isna()].head(50)
    matches = SiameseRecognizer.load(bundle.path).predict(good["source"].tolist())
    assert good["label"].tolist() == [m.label for m in matches]
    assert good["distance"].tolist() == pytest.approx([m.distance for m in matches], abs=1e-5)
    assert [list(k) for k in good["top_k_labels"]] == [[label for label, _ in m.top_k] for m in matches]
    assert set(clean["model_version"]) == {"local"} and set(clean["decision"].dropna()) <= {"known", "unknown"}


def test_a_rerun_after_kill_9_gives_the_rows_of_one_clean_run(bundle, images, clean, tmp_path):
    out = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    command = [sys.executable, "-m", "pipelines.cli", "predict-batch", str(images), "--out", str(out), "--model",
               str(bundle.path), "--shard-size", "10"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = list(parts.glob("part-*.parquet"))
    assert not out.exists() and 2 <= len(written) < 46, "the kill came after the run ended"
    for part in written:  # every part there is whole
        assert pq.read_table(part).num_rows == 10

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(written)} already written" in rerun.stdout or f"{len(written) + 1} already written" in rerun.stdout
    again = pq.read_table(out).to_pandas()
    assert_same_rows(again, clean)


def test_two_dask_workers_give_the_same_rows(bundle, images, clean, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        done = predict_batch(str(images), tmp_path / "dask.parquet", bundle.path, model_identity(str(bundle.path)),
                             cluster.scheduler_address, shard_size=40, progress=False)
    assert done["images"] == 451 and done["skipped_shards"] == 0
    rows = pq.read_table(tmp_path / "dask.parquet").to_pandas()
    assert_same_rows(rows, clean)


def test_the_flow_runs_the_same_code(bundle, images, clean, tmp_path, prefect_server):
    from pipelines.flows import batch_predict_flow

    done = batch_predict_flow(str(images), str(tmp_path / "flow.parquet"), str(bundle.path), shard_size=40)
    assert (done["images"], done["errors"]) == (451, 1)
    assert_same_rows(pq.read_table(tmp_path / "flow.parquet").to_pandas(), clean)
