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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def _params(write_params, folder: Path, log: Path | str, experiment: str = "siamese", **monitoring) -> Path:
    """params.yaml in ``folder``: the log at ``log``, the monitoring runs in ``<experiment>-monitoring``."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"register.model_name": MODEL, "register.experiment": experiment, "monitoring.log_uri": str(log),
                "monitoring.flush_seconds": 0.2, "monitoring.min_records": 10, "monitoring.review_dir": str(folder / "review"),
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


def _log_traffic(watched, log: Path, images: list[str], settings, reject: bool | None = None) -> list[str]:
    """Ask the champion as the served model is asked, logging to ``log`` (``reject``: rejection on or off instead of
    the bundle's setting); the labels it answered."""
    import pandas as pd

    from pipelines.inference_log import open_log
    from pipelines.registry import champion_uri, load_champion, model_identity

    champion = load_champion(MODEL)
    model = champion.unwrap_python_model()
    if reject is not None:
        model.recognizer = model.recognizer.with_settings(reject_unknown=reject)
    inference_log = open_log(settings.model_copy(update={"log_uri": str(log)}), model_identity(champion_uri(MODEL)), "http")
    model.log_to(inference_log)
    answered = []
    for start in range(0, len(images), 4):
        answers = champion.predict(pd.DataFrame({"image": [encode_image(p) for p in images[start:start + 4]]}))
        answered += answers["label"].tolist()
    inference_log.close()
    return answered


@pytest.fixture(scope="module")
def traffic(watched, tmp_path_factory):
    """The champion's logs (embeddings kept) of known traffic and of held-out traffic, written once: copy them."""
    from pipelines.params import MonitoringConfig

    root = tmp_path_factory.mktemp("traffic")
    settings = MonitoringConfig(flush_seconds=0.2, log_embeddings=True, review_dir=str(root / "review"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
        for name in ("known", "heldout"):
            _log_traffic(watched, root / name, getattr(watched, name), settings)
    return SimpleNamespace(known=root / "known", heldout=root / "heldout")


def test_the_monitoring_flow_tells_held_out_traffic_from_known_traffic(watched, traffic, write_params, tmp_path,
                                                                       prefect_server, monkeypatch):
    """Known traffic fires no rule; held-out digits raise the unknown rate and shift the distances, and the flow
    logs both windows as points of the version's run in the monitoring experiment, each with an HTML report."""
    from mlflow import MlflowClient

    from pipelines.flows import monitoring_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    results = {}
    for name in ("known", "heldout"):
        shutil.copytree(getattr(traffic, name), tmp_path / name / "log")
        results[name] = monitoring_flow(str(_params(write_params, tmp_path / name, tmp_path / name / "log")))
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
    assert Path(results["heldout"]["report"]).read_text() == page.read_text()
    assert results["heldout"]["report_uri"] == f"runs:/{run.info.run_id}/{pages[-1]}"


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
    assert json.loads(batch.dataset.profile) == {"images": len(added), "classes": 1}  # no class names
    assert "digit 5" not in batch.dataset.profile + batch.dataset.source
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


def _rows(distances, decisions=None, times=None, version: str = "1", source: str = "http", alias: str = "champion",
          agrees=None):
    """Records of ``watched`` with these nearest distances, alternately of classes a and b."""
    import pyarrow as pa

    from pipelines.inference_log import SCHEMA

    now = datetime.now(UTC)
    rows = [{"time": times[n] if times else now, "request_id": f"r{n}", "source": source, "model_name": MODEL,
             "model_version": version, "model_alias": alias, "label": "ab"[n % 2], "distance": float(distance),
             "decision": decisions[n] if decisions else "known", "latency_ms": 1.0,
             "agrees": None if agrees is None else agrees[n]} for n, distance in enumerate(distances)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _reference(unknown_rate: float):
    """A test split's profile: nearest distances uniform on [0, 1], this share of unknowns, classes a and b."""
    from siamese_core.reference import ReferenceProfile

    scores = (np.arange(400) >= 400 * (1 - unknown_rate)).astype(float)
    return ReferenceProfile(np.linspace(0, 1, 400), scores, 0.5, {"a": 200, "b": 200}, {"a": 5, "b": 5},
                            np.zeros((0, 4), np.float16))


def test_a_rule_fires_only_on_an_effect_over_its_limit_that_is_significant_with_enough_records():
    """Distances shifted by a KS statistic of 0.35 (limit 0.3) and 5 unknowns in 12 (0.42 against a reference of
    0.2, limit 0.25): with 12 records neither test is significant at alpha 0.01, so nothing fires and the notes say
    why; with 200 records both fire, each with its p-value; under min_records nothing fires."""
    from pipelines.monitoring import assess_traffic
    from pipelines.params import MonitoringConfig

    reference, now = _reference(0.2), datetime.now(UTC)

    def judged(n: int, unknowns: int, min_records: int = 10):
        table = _rows(np.linspace(0.35, 1.0, n), ["unknown"] * unknowns + ["known"] * (n - unknowns))
        return assess_traffic(table, reference, MonitoringConfig(min_records=min_records), now - timedelta(hours=1),
                              now + timedelta(hours=1), MODEL, "1")

    few = judged(12, 5)
    assert few.figures["distance_ks"] == pytest.approx(0.35) and few.figures["unknown_rate"] == pytest.approx(5 / 12)
    assert few.figures["distance_ks_pvalue"] > 0.01 and few.figures["unknown_rate_pvalue"] > 0.01
    assert few.fired == [], few.fired
    assert [note.split(" (p = ")[0] for note in few.notes if "not significant" in note] == [
        "unknown_rate 0.417 is over its limit 0.25 but not significant", "distance_ks 0.350 is over its limit 0.3 but not "
        "significant"]
    many = judged(200, 70)
    assert [rule.split(" (p = ")[0] for rule in many.fired] == ["unknown_rate 0.350 > 0.25", "distance_ks 0.350 > 0.3"]
    assert all(float(rule.split(" (p = ")[1].rstrip(")")) < 1e-4 for rule in many.fired), many.fired
    assert judged(200, 70, min_records=500).fired == []
    assert "200 records, under monitoring.min_records (500): no rule fires" in judged(200, 70, min_records=500).notes


def test_records_per_hour_are_taken_over_the_records_span_and_older_logs_read(tmp_path):
    """80 records sent within one minute of a 24-hour window: 4800 an hour, not 3.3; a burst of 60 in 59 ms reads
    3600 an hour (the rate of its minute), not 3.7 million. A log file written before ``over_threshold`` existed
    reads, the column null, and the over-threshold rate is then unknown (None)."""
    from pipelines.inference_log import SCHEMA
    from pipelines.monitoring import assess_traffic, read_window
    from pipelines.params import MonitoringConfig

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    table = _rows([0.5] * 80, times=[start + timedelta(seconds=60 * n / 79) for n in range(80)])
    older = table.drop_columns(["over_threshold"])
    assert older.schema.equals(SCHEMA.remove(SCHEMA.get_field_index("over_threshold")))
    folder = tmp_path / "log" / f"date={start:%Y-%m-%d}"
    folder.mkdir(parents=True)
    pq.write_table(older, folder / "older.parquet")
    window = read_window(str(tmp_path / "log"), start - timedelta(hours=22), start + timedelta(hours=2))
    assert window.notes == [] and window.table.column("over_threshold").null_count == 80
    report = assess_traffic(window.table, None, MonitoringConfig(), start - timedelta(hours=22),
                            start + timedelta(hours=2), MODEL, "1")
    assert report.figures["span_hours"] == pytest.approx(1 / 60)
    assert report.figures["records_per_hour"] == pytest.approx(4800)
    assert report.figures["over_threshold_rate"] is None and report.figures["unknown_rate"] == 0
    burst = _rows([0.5] * 60, times=[start + timedelta(milliseconds=n) for n in range(60)])
    burst_report = assess_traffic(burst, None, MonitoringConfig(), start, start + timedelta(hours=1), MODEL, "1")
    assert burst_report.figures["records_per_hour"] == pytest.approx(3600)  # 60 in 59 ms: their minute's rate


def test_the_champions_answers_are_chosen_and_shadow_and_canary_records_counted_apart():
    """A window after a promotion, in a rollout: answers of the champion (version 2) and of the champion before it
    (version 1), a shadow and a canary of version 3, and records of a version 9 the registry never held."""
    import pyarrow as pa

    from pipelines.monitoring import roles, rollout_records, served_version

    early, late = datetime.now(UTC) - timedelta(hours=2), datetime.now(UTC) - timedelta(hours=1)
    table = pa.concat_tables([
        _rows([0.1] * 8, times=[early] * 8, version="1"), _rows([0.1] * 5, times=[late] * 5, version="2"),
        _rows([0.9] * 8, version="3", source="shadow", alias="challenger", agrees=[True] * 6 + [False] * 2),
        _rows([0.9] * 4, version="3", alias="challenger"), _rows([0.1] * 3, version="9")])
    answers, shadow, canary = roles(table, "challenger")
    assert (answers.num_rows, shadow.num_rows, canary.num_rows) == (16, 8, 4)
    held = {"1", "2", "3"}.__contains__
    assert served_version(answers, MODEL, "2", held) == ("2", [
        f"skipped 3 records of {MODEL} version 9: the registry has no such version",
        f"left out 8 answers of {MODEL} version 1: the judged version is 2"])
    version, notes = served_version(answers, MODEL, None, held)  # no champion alias: the version that answered last
    assert version == "2" and notes[1] == ("the champion (no alias) gave no answers in the window: judging version 2, "
                                           "which answered last")
    assert rollout_records(shadow, "shadow") == [{"role": "shadow", "version": "3", "records": 8, "agreement": 0.75}]
    assert rollout_records(canary, "canary") == [{"role": "canary", "version": "3", "records": 4, "agreement": None}]


def test_the_monitoring_flow_judges_the_champions_answers_and_keeps_shadow_and_canary_apart(
        watched, traffic, write_params, tmp_path, prefect_server, monkeypatch):
    """Beside the champion's 60 answers to known traffic, as many shadow and canary records of held-out digits (of
    version 1 too, a tie): the window judges the 60 answers only and fires nothing; the rollouts are counted apart."""
    import pyarrow as pa

    from pipelines.flows import monitoring_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    log = tmp_path / "log"
    shutil.copytree(traffic.known, log)
    heldout = pa.concat_tables([pq.read_table(path) for path in sorted(traffic.heldout.rglob("*.parquet"))])

    def as_role(source: str, agrees: bool | None):
        table = heldout
        for name, value, kind in (("source", source, pa.string()), ("model_alias", "challenger", pa.string()),
                                  ("agrees", agrees, pa.bool_())):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array([value] * len(table), kind))
        return table

    day = next(log.glob("date=*"))
    pq.write_table(as_role("shadow", False), day / "shadow.parquet")
    pq.write_table(as_role("http", None), day / "canary.parquet")
    result = monitoring_flow(str(_params(write_params, tmp_path, log, experiment="roles")))
    assert (result["model_version"], result["figures"]["records"], result["fired"]) == ("1", 60, []), result
    assert result["rollouts"] == [{"role": "shadow", "version": "1", "records": 60, "agreement": 0.0},
                                  {"role": "canary", "version": "1", "records": 60, "agreement": None}]


def test_the_log_records_what_the_client_was_answered_and_the_would_be_rejection_apart(
        watched, write_params, tmp_path, prefect_server, monkeypatch):
    """The same known and held-out digits, asked with rejection on and off. On: the decision is the answer, and
    over_threshold agrees with it. Off: every client got a class, every decision is known, and the answers over the
    threshold (the same ones) are marked over_threshold; monitoring reports unknown_rate 0 beside the over-threshold
    rate, and the unknown-rate rule does not fire on what no client saw."""
    from pipelines.flows import monitoring_flow
    from pipelines.params import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    images = watched.known[:12] + watched.heldout[:12]
    digests = [hashlib.sha256(Path(image).read_bytes()).hexdigest() for image in images]
    over = {}
    for reject in (True, False):
        folder = tmp_path / f"reject-{reject}"
        params = _params(write_params, folder, folder / "log", experiment=f"reject-{reject}")
        answered = dict(zip(digests, _log_traffic(watched, folder / "log", images, load_params(params).monitoring,
                                                  reject)))
        records = _records(folder / "log", len(images))
        assert len(records) == len(images)
        seen = [(answered[r["sha256"]], r["decision"], r["over_threshold"]) for r in records]
        over[reject] = {r["sha256"] for r in records if r["over_threshold"]}
        if reject:
            assert all(decision == ("unknown" if label == "unknown" else "known") for label, decision, _ in seen)
            assert all(flag == (decision == "unknown") for _, decision, flag in seen), seen
        else:
            assert all(label != "unknown" and decision == "known" for label, decision, _ in seen), seen
            result = monitoring_flow(str(params))
            assert result["figures"]["unknown_rate"] == 0
            assert result["figures"]["over_threshold_rate"] == len(over[False]) / len(images)
            assert not any(rule.startswith("unknown_rate") for rule in result["fired"])
    assert over[True] == over[False] and len(over[False]) >= 6  # most held-out digits are over the threshold


def test_a_failed_window_ends_its_run_failed_and_the_next_window_finished(watched, traffic, write_params, tmp_path,
                                                                         prefect_server, monkeypatch):
    """The monitoring run is ended by the one lifecycle: a window that fails (its report cannot be written) leaves
    the version's run FAILED with the error; the next window resumes it and ends it FINISHED, the error gone."""
    from mlflow import MlflowClient

    import pipelines.monitoring_run as monitoring_run
    from pipelines.flows import monitoring_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    shutil.copytree(traffic.known, tmp_path / "log")
    params = str(_params(write_params, tmp_path, tmp_path / "log", experiment="lifecycle"))
    first = monitoring_flow(params)
    writes = monitoring_run.report_html

    def full_disk(*args):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(monitoring_run, "report_html", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        monitoring_flow(params)
    client = MlflowClient(watched.uri)
    run = client.get_run(first["run_id"])
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    monkeypatch.setattr(monitoring_run, "report_html", writes)
    again = monitoring_flow(params)
    run = client.get_run(first["run_id"])
    assert again["run_id"] == first["run_id"] and run.info.status == "FINISHED" and "error" not in run.data.tags


def test_the_drift_event_says_which_automations_expect_it(watched, traffic, write_params, tmp_path, prefect_server,
                                                          monkeypatch):
    """On a Prefect server with an automation that expects the model's drift event and one for another model, the
    window names the first only; with no server it says that nothing received the event."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import DoNothing
    from prefect.events.schemas.automations import AutomationCore, EventTrigger
    from prefect.settings import PREFECT_API_URL

    from pipelines.flows import monitoring_flow
    from pipelines.monitoring import EVENT
    from pipelines.monitoring_run import delivery

    assert delivery(None, []) == (
        "nothing received it: PREFECT_API_URL is not set, so siamese.monitoring.drift went to a temporary Prefect "
        "server that stopped with this flow; the retraining deployment and its drift trigger need a Prefect server: "
        "start one (prefect server start), set PREFECT_API_URL and run `siamese flows serve`")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    shutil.copytree(traffic.heldout, tmp_path / "log")
    params = str(_params(write_params, tmp_path, tmp_path / "log", experiment="events"))
    with get_client(sync_client=True) as prefect:
        made = [prefect.create_automation(AutomationCore(
            name=f"retrain {model}", trigger=EventTrigger(expect={EVENT}, match={"prefect.resource.id": f"siamese.model.{model}"}),
            actions=[DoNothing()])) for model in (MODEL, "another")]
        try:
            result = monitoring_flow(params)
        finally:
            for automation in made:
                prefect.delete_automation(automation)
    assert result["fired"] and result["event"] == (f"sent to the Prefect server {PREFECT_API_URL.value()}; automations "
                                                   f"that expect it: 'retrain {MODEL}'")


def test_siamese_flows_monitor_prints_the_report_and_where_the_event_went_without_tensorflow(
        watched, traffic, write_params, tmp_path, prefect_server):
    """`siamese flows monitor` in a fresh process on held-out traffic: the drift, the event sent to a server where no
    automation expects it (never "emitted"), the report's path, and TensorFlow never imported."""
    from prefect.settings import PREFECT_API_URL

    shutil.copytree(traffic.heldout, tmp_path / "log")
    params = _params(write_params, tmp_path, tmp_path / "log", experiment="cli")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pipelines.cli import app\n"
            f"done = CliRunner().invoke(app, ['flows', 'monitor', '--params', {str(params)!r}])\n"
            "print(done.output)\nprint('tensorflow imported:', 'tensorflow' in sys.modules)\nsys.exit(done.exit_code)")
    url = PREFECT_API_URL.value()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(watched, PREFECT_API_URL=url),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "tensorflow imported: False" in lines
    assert any(line.startswith("drift: unknown_rate ") for line in lines), lines
    assert (f"drift event: sent to the Prefect server {url}, where no automation expects siamese.monitoring.drift: "
            "nothing starts a retraining (run `siamese flows serve` against that server)") in lines
    assert not any("emitted" in line for line in lines)
    [report] = [line.removeprefix("report: ") for line in lines if line.startswith("report: ")]
    page, _, uri = report.partition(" (")
    assert "<h1>Monitoring: watched version 1</h1>" in Path(page).read_text()
    assert uri.startswith("runs:/") and uri.endswith(f"/windows/{Path(page).name})")
