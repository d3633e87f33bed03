"""After shipping: the inference log on every path, the reference profile, the monitoring flow, review and feedback.

A tiny champion of digits 0-2 is served; known traffic is unseen drawings of those digits, held-out
traffic is digits 5-7, which the model has never seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipelines.pyfunc_model import encode_image

from support.http import HOST, free_port, stop_group, wait_until_ready
from support.images import make_digits_dataset
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

MODEL = "watched"


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A champion that rejects unknowns, registered with its reference profile, and traffic to send it."""
    from siamese_core.data import scan_folder
    from siamese_core.evaluation import assess_bundle
    from siamese_core.recognizer import SiameseRecognizer, store_threshold
    from siamese_core.reference import REFERENCE_FILE, reference_profile

    root = tmp_path_factory.mktemp("watched")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = use_sqlite_store(monkeypatch, root)
        bundle = make_tiny_bundle(root)
        _, reference_test = make_digits_dataset(root / "reference", train_per_class=9, test_per_class=15)
        _, known = make_digits_dataset(root / "known", train_per_class=24, test_per_class=20)
        _, heldout = make_digits_dataset(root / "heldout", train_per_class=0, test_per_class=20, first=5)
        recognizer = SiameseRecognizer.load(bundle.path).with_settings(baselines=False, reject_unknown=True)
        assessment = assess_bundle(recognizer, scan_folder(reference_test))
        served = recognizer.save(root / "served-bundle")
        calibration = assessment.report.calibration
        store_threshold(served, calibration.threshold, calibration.to_dict())
        reference_profile(assessment, recognizer).save(served / REFERENCE_FILE)
        register_bundle(pipeline_params(MODEL), served, {"top1": 1.0}, bundle.history, [], {},
                        score_champion=logged_scorer())
    return SimpleNamespace(uri=uri, root=root, known=sorted(map(str, Path(known).glob("*/*.png"))),
                           heldout=sorted(map(str, Path(heldout).glob("*/*.png"))), train=bundle.path.parent / "data")


def _params(write_params, folder: Path, log: Path | str, **monitoring) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"register.model_name": MODEL, "monitoring.log_uri": str(log), "monitoring.flush_seconds": 0.2,
                "monitoring.min_records": 10, "monitoring.review_dir": str(folder / "review"),
                **{f"monitoring.{key}": value for key, value in monitoring.items()}}
    return write_params(folder / "params.yaml", settings)


def _env(watched, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": watched.uri, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _serve(watched, cwd: Path, params: Path, **extra: str) -> tuple[str, subprocess.Popen, Path]:
    port, log_path = free_port(), cwd / "serve.log"
    command = [os.path.join(os.path.dirname(sys.executable), "siamese"), "serve", "--model",
               f"models:/{MODEL}@champion", "--params", str(params), "--host", HOST, "--port", str(port)]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=cwd, env=_env(watched, **extra), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://{HOST}:{port}"
    wait_until_ready(base, server, log_path)
    return base, server, log_path


def _ask(base: str, image: str, request_id: str | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"{base}/invocations", method="POST", headers={
        "Content-Type": "application/json", **({"X-Request-Id": request_id} if request_id else {})},
        data=json.dumps({"dataframe_records": [{"image": encode_image(image)}]}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read()), response.headers["X-Request-Id"]


def _stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        return json.loads(response.read())["inference_log"]


def _records(folder: Path, least: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pylist() if folder.exists() else []
        if len(rows) >= least or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_every_path_writes_one_record_per_image(watched, write_params, tmp_path, prefect_server, monkeypatch):
    """siamese serve (HTTP), predict_flow and siamese predict --log all write the same records to one log."""
    from pipelines.flows import predict_flow

    log = tmp_path / "log"
    params = _params(write_params, tmp_path, log)
    base, server, _ = _serve(watched, tmp_path, params)
    try:
        answers = [_ask(base, image, f"client-{n}") for n, image in enumerate(watched.known[:3])]
        assert [(status, request_id) for status, _, request_id in answers] == [(200, f"client-{n}") for n in range(3)]
        assert _ask(base, watched.known[3])[2]  # no id sent: the server makes one and returns it
    finally:
        stop_group(server)
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "siamese"), "predict", watched.heldout[0],
                           "--model", f"models:/{MODEL}@champion", "--log", "--params", str(params)],
                          cwd=tmp_path, env=_env(watched), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    predict_flow(watched.known[4:6], MODEL, str(params))
    records = _records(log, 7)
    assert sorted(r["source"] for r in records) == ["cli", "flow", "flow", "http", "http", "http", "http"]
    by_request = {r["request_id"]: r for r in records}
    first = by_request["client-0"]
    assert first["sha256"] == hashlib.sha256(Path(watched.known[0]).read_bytes()).hexdigest()
    assert (first["bytes"], first["width"], first["height"]) == (Path(watched.known[0]).stat().st_size, 32, 32)
    assert (first["model_name"], first["model_version"], first["model_alias"]) == (MODEL, "1", "champion")
    assert first["label"] == answers[0][1]["predictions"][0]["label"]
    assert first["top_k_labels"][0] == first["label"] or first["decision"] == "unknown"
    assert first["latency_ms"] > 0 and first["embedding"] is None and first["unknown_score"] is not None
    assert first["decision"] in {"known", "unknown"} and first["margin"] >= 0


def test_a_stopped_s3_server_loses_records_but_never_a_request(watched, write_params, tmp_path):
    """The log on S3: the server stops; every request is still answered 200, the lost records are counted,
    and the server says so once."""
    import boto3

    keys = {"AWS_ACCESS_KEY_ID": "monitoring", "AWS_SECRET_ACCESS_KEY": "monitoring-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}
    s3_port = free_port()
    with open(tmp_path / "s3.log", "wb") as s3_log:
        s3 = subprocess.Popen([sys.executable, "-m", "pipelines.s3server", HOST, str(s3_port), str(tmp_path / "journal")],
                              env={**os.environ, **keys}, stdout=s3_log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{HOST}:{s3_port}"
    try:
        bucket = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in keys.items()
                                                              if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        for _ in range(100):
            try:
                bucket.create_bucket(Bucket="logs")
                break
            except Exception:
                time.sleep(0.2)
        params = _params(write_params, tmp_path, "s3://logs/inference")
        base, server, log_path = _serve(watched, tmp_path, params, MLFLOW_S3_ENDPOINT_URL=endpoint, **keys)
        try:
            assert all(_ask(base, image)[0] == 200 for image in watched.known[:2])
            deadline = time.monotonic() + 30
            while _stats(base)["written"] < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _stats(base)["written"] == 2
            stored = bucket.list_objects_v2(Bucket="logs", Prefix="inference/")["Contents"]
            assert all(item["Key"].endswith(".parquet") and "/date=" in item["Key"] for item in stored)
            stop_group(s3)
            assert [_ask(base, image)[0] for image in watched.known[2:8]] == [200] * 6
            deadline = time.monotonic() + 120
            while _stats(base)["dropped"] < 6 and time.monotonic() < deadline:
                time.sleep(0.5)
            stats = _stats(base)
            assert (stats["written"], stats["dropped"]) == (2, 6), stats
        finally:
            stop_group(server)
        assert log_path.read_text().count("dropping records") == 1, log_path.read_text()[-3000:]
    finally:
        stop_group(s3)


def test_kill_9_of_the_server_leaves_only_readable_files(watched, write_params, tmp_path):
    """A file per record, requests in flight, then SIGKILL: every visible file reads whole."""
    log = tmp_path / "log"
    params = _params(write_params, tmp_path, log, flush_records=1, flush_seconds=0.05)
    base, server, _ = _serve(watched, tmp_path, params)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_ask, base, image) for image in watched.known * 2]
            deadline = time.monotonic() + 60
            while len(list(log.rglob("*.parquet"))) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.killpg(server.pid, signal.SIGKILL)
            for future in futures:
                future.exception()  # answered, or cut off by the kill
    finally:
        stop_group(server)
    files = [f for f in log.rglob("*.parquet") if not f.name.startswith(".")]
    assert len(files) >= 10
    assert sum(pq.read_table(f).num_rows for f in files) == len(files)  # one record each, none torn
    assert ds.dataset(log, format="parquet", partitioning="hive").to_table().num_rows == len(files)


def _log_traffic(watched, log: Path, images: list[str], settings) -> None:
    """Ask the champion as the served model is asked, logging to ``log``."""
    import pandas as pd

    from pipelines.inference_log import open_log
    from pipelines.registry import champion_uri, load_champion

    champion = load_champion(MODEL)
    inference_log = open_log(settings.model_copy(update={"log_uri": str(log)}), champion_uri(MODEL), "http")
    champion.unwrap_python_model().log_to(inference_log)
    for start in range(0, len(images), 4):
        champion.predict(pd.DataFrame({"image": [encode_image(p) for p in images[start:start + 4]]}))
    inference_log.close()


def test_the_monitoring_flow_tells_held_out_traffic_from_known_traffic(watched, write_params, tmp_path, prefect_server,
                                                                       monkeypatch):
    """Known traffic fires no rule; held-out digits raise the unknown rate and shift the distances, and the flow
    logs both windows as points of the version's run in the monitoring experiment, each with an HTML report."""
    from mlflow import MlflowClient

    from pipelines.flows import monitoring_flow
    from pipelines.params import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    results = {}
    for name, images in (("known", watched.known), ("heldout", watched.heldout)):
        params = _params(write_params, tmp_path / name, tmp_path / name / "log", log_embeddings=True)
        _log_traffic(watched, tmp_path / name / "log", images, load_params(params).monitoring)
        results[name] = monitoring_flow(str(params))
    known, heldout = results["known"]["figures"], results["heldout"]["figures"]
    assert known["records"] == heldout["records"] == 60
    assert results["known"]["fired"] == [], results["known"]
    assert heldout["unknown_rate"] > max(0.25, known["unknown_rate"] + 0.2)
    assert heldout["distance_ks"] > max(0.3, known["distance_ks"] + 0.2)
    assert heldout["embedding_drift_auc"] > known["embedding_drift_auc"]
    fired = " ".join(results["heldout"]["fired"])
    assert "unknown_rate" in fired and "distance_ks" in fired
    client = MlflowClient(watched.uri)
    experiment = client.get_experiment_by_name("siamese-monitoring")
    [run] = client.search_runs([experiment.experiment_id])  # one run per version, a point per window
    assert run.info.run_id == results["known"]["run_id"] == results["heldout"]["run_id"]
    history = sorted(client.get_metric_history(run.info.run_id, "unknown_rate"), key=lambda point: point.step)
    assert [(p.step, p.value) for p in history] == [(0, known["unknown_rate"]), (1, heldout["unknown_rate"])]
    assert run.data.tags["drift"] == "true" and run.data.tags["last_window"] == results["heldout"]["window"]
    pages = sorted(item.path for item in client.list_artifacts(run.info.run_id, "windows"))
    assert len(pages) == 2
    page = Path(client.download_artifacts(run.info.run_id, pages[-1], str(tmp_path)))
    assert "Drift:" in page.read_text() and "data:image/png;base64" in page.read_text()


def test_review_queue_and_feedback_import_add_a_labelled_class_as_a_new_data_version(watched, write_params, tmp_path,
                                                                                     monkeypatch):
    """Unknown answers land in the review queue with their images; a person sorts them into labelled/<class>/;
    the import adds them to the training data (nothing rewritten), keeps a manifest, runs dvc add, and the
    next training run logs the batch as a dataset input."""
    from pipelines.feedback import import_feedback
    from pipelines.params import load_params
    from pipelines.tracking import PipelineRun
    from siamese_core.errors import DatasetError

    project = tmp_path / "project"
    shutil.copytree(watched.train, project / "data")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for variable, value in {**env, "MLFLOW_TRACKING_URI": watched.uri}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.chdir(project)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "add", "-q", "data"]):
        subprocess.run(command, check=True)
    before = Path("data.dvc").read_text()
    params = _params(write_params, project, project / "log", log_images=True)
    settings = load_params(params).monitoring
    _log_traffic(watched, project / "log", watched.heldout[:20], settings)  # digit 5
    pending = sorted((project / "review" / "pending").rglob("*.png"))
    assert pending and all(p.with_suffix(".json").is_file() for p in pending)
    answered = json.loads(pending[0].with_suffix(".json").read_text())
    assert answered["decision"] == "unknown" and answered["top_k"] and answered["model_version"] == "1"
    labelled = project / "review" / "labelled" / "digit 5"
    labelled.mkdir(parents=True)
    for image in pending:  # the person's work: these are fives
        for moved in (image, image.with_suffix(".json")):
            moved.rename(labelled / moved.name)
    (labelled / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        import_feedback(labelled.parent, "data/train", by="alice")
    assert not Path("data/train/digit 5").exists() and Path("data.dvc").read_text() == before
    (labelled / "broken.png").unlink()
    done = import_feedback(labelled.parent, "data/train", by="alice")
    added = sorted(Path("data/train/digit 5").glob("feedback-*.png"))
    assert len(added) == len(done["images"]) == len(pending)
    assert done["classes"] == ["digit 5"] and done["imported_by"] == "alice"
    assert {i["request_id"] for i in done["images"]} <= {json.loads(p.read_text())["request_id"]
                                                          for p in (project / "review" / "imported").rglob("*.json")}
    assert Path("data.dvc").read_text() != before and not any(labelled.iterdir())
    shutil.copy(added[0], labelled / "again.png")  # the same image a second time: skipped, nothing rewritten
    again = import_feedback(labelled.parent, "data/train", by="bob")
    assert (again["images"], again["skipped_already_present"]) == ([], 1)
    train_params = load_params(params, {"data.train_dir": "data/train", "data.test_dir": "data/test",
                                        "data.heldout_dir": None, "register.experiment": "feedback-test"})
    run = PipelineRun.start(train_params)
    inputs = {d.dataset.name: d for d in run.client.get_run(run.run_id).inputs.dataset_inputs}
    batch = inputs[f"feedback-{done['batch']}"]
    assert batch.tags[0].value == "feedback"
    assert batch.dataset.digest == hashlib.sha256(Path(done["manifest"]).read_bytes()).hexdigest()[:32]
    assert json.loads(batch.dataset.profile)["per_class"] == {"digit 5": len(added)}
    run.end()


def test_a_request_id_never_steers_where_a_review_image_is_written(watched, write_params, tmp_path):
    """Issue 32, row 1: request ids that climb into the training data or out of the project write nothing outside
    review/pending/; the images are named by the server, the client's id stays data in the sidecar, and the queue
    is private (0600 files, 0700 folders)."""
    (tmp_path / "data" / "train" / "Korean__character01").mkdir(parents=True)
    params = _params(write_params, tmp_path, tmp_path / "log", log_images=True)
    hostile = ["../../../data/train/Korean__character01/injected", "../../../../escaped/evil", "/tmp/evil", "..",
               "..\\..\\x"]
    base, server, _ = _serve(watched, tmp_path, params)
    try:
        for request_id in hostile:
            assert [_ask(base, image, request_id)[0] for image in watched.heldout[:3]] == [200] * 3
        deadline = time.monotonic() + 30
        while _stats(base)["written"] < 15 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stats(base)["review"] >= 5
    finally:
        stop_group(server)
    review = tmp_path / "review"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(review / "pending")
               and not p.is_relative_to(tmp_path / "log") and p.name not in ("serve.log", "params.yaml")]
    assert outside == [] and not (tmp_path.parent / "escaped").exists()
    items = sorted((review / "pending").rglob("*.*"))
    assert {p.parent.parent for p in items} == {review / "pending"}
    assert {json.loads(p.read_text())["request_id"] for p in items if p.suffix == ".json"} <= set(hostile)
    assert {oct(p.stat().st_mode & 0o777) for p in items} == {"0o600"}
    assert {oct(p.stat().st_mode & 0o777) for p in (review, review / "pending", items[0].parent)} == {"0o700"}


def test_the_monitoring_flow_names_and_skips_bad_files_and_versions_the_registry_does_not_hold(
        watched, write_params, tmp_path, prefect_server, monkeypatch):
    """Beside good records of version 1: random bytes, a truncated file, an empty one, two of other schemas, and
    more records of a version 999 that was never registered. Each is named and skipped in one line; version 1 is
    judged on its own records."""
    import pyarrow as pa

    from pipelines.flows import monitoring_flow
    from pipelines.params import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    log = tmp_path / "log"
    params = _params(write_params, tmp_path, log)
    _log_traffic(watched, log, watched.known[:12], load_params(params).monitoring)
    good = sorted(log.rglob("*.parquet"))
    day, records = good[0].parent, pa.concat_tables([pq.read_table(path) for path in good])
    assert records.num_rows == 12
    unregistered = records.set_column(records.schema.get_field_index("model_version"), "model_version",
                                      pa.array(["999"] * 12))
    pq.write_table(pa.concat_tables([unregistered] * 2), day / "unregistered.parquet")
    (day / "random.parquet").write_bytes(os.urandom(4096))
    (day / "truncated.parquet").write_bytes(good[0].read_bytes()[:good[0].stat().st_size // 2])
    (day / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"a": [1, 2]}), day / "foreign.parquet")
    pq.write_table(records.set_column(0, "time", pa.array(["yesterday"] * 12)), day / "retyped.parquet")
    result = monitoring_flow(str(params))
    assert (result["model_version"], result["figures"]["records"]) == ("1", 12.0), result
    notes = result["notes"]
    for name, problem in (
        ("random.parquet", "Parquet magic bytes not found in footer"),
        ("truncated.parquet", "Parquet magic bytes not found in footer"),
        ("empty.parquet", "Parquet file size is 0 bytes"),
        ("foreign.parquet", "not a file of the inference log (no column time, request_id, model_name, "
                            "model_version, label, distance, decision, latency_ms)"),
        ("retyped.parquet", "not a file of the inference log (column time is string, not timestamp[ms, tz=UTC])"),
    ):
        [note] = [note for note in notes if f"/{name}:" in note]
        assert note.startswith(f"skipped {day / name}: {problem}"), note
    assert f"skipped 24 records of {MODEL} version 999: the registry has no such version" in notes
    assert len([note for note in notes if note.startswith("skipped ")]) == 6 and not any("\n" in n for n in notes)


def _write_records(folder: Path, name: str, times: list, model: str = MODEL) -> None:
    import pyarrow as pa

    from pipelines.inference_log import SCHEMA

    rows = [{"time": moment, "request_id": f"r{n}", "model_name": model, "model_version": "1", "label": "digit 1",
             "distance": 0.1, "decision": "known", "latency_ms": 2.0} for n, moment in enumerate(times)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / name)


def test_an_empty_window_says_why(watched, write_params, tmp_path, prefect_server, monkeypatch):
    """No log folder: the flow names the path. Records of another model only, and records dated two days ahead:
    the flow names the models it saw and counts the records in the future."""
    from datetime import UTC, datetime, timedelta

    from pipelines.flows import monitoring_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    missing = tmp_path / "nowhere" / "log"
    result = monitoring_flow(str(_params(write_params, tmp_path / "missing", missing)))
    assert result["notes"] == ["no records in the window", f"the inference log {missing} does not exist: nothing "
                               "was logged there yet, or the servers log elsewhere (monitoring.log_uri, "
                               "$SIAMESE_INFERENCE_LOG)"]
    log, now = tmp_path / "log", datetime.now(UTC)
    _write_records(log / f"date={now:%Y-%m-%d}", "other.parquet", [now - timedelta(minutes=5)] * 3, model="other")
    ahead = now + timedelta(days=2)
    _write_records(log / f"date={ahead:%Y-%m-%d}", "ahead.parquet", [ahead] * 1000)
    result = monitoring_flow(str(_params(write_params, tmp_path / "elsewhere", log)))
    assert result["figures"]["records"] == 0 and result["notes"][0] == "no records in the window"
    assert result["notes"][1].startswith("1000 records are dated at or after the window's end (")
    assert result["notes"][1].endswith(" UTC) and were left out: is the clock of a machine that logs to it ahead?")
    assert result["notes"][2] == f"no records of {MODEL} (register.model_name) in the window; it holds records of other (3)"
