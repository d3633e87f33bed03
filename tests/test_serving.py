"""Serving the champion with `mlflow models serve` and calling it over HTTP on the loopback interface."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from mlflow_fixtures import make_tiny_bundle, pipeline_params, use_sqlite_store

from pipelines import registry
from pipelines.pyfunc_model import encode_image

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120
MAX_IMAGE_BYTES = 50_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_until_ready(base: str, server: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the uvicorn process it started (one process group)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Register a tiny champion in a fresh store and serve it; yields (base URL, gallery images)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _serve(tmp_path, monkeypatch)


def _serve(tmp_path, monkeypatch):
    uri = use_sqlite_store(monkeypatch, tmp_path)
    bundle = make_tiny_bundle(tmp_path)
    metrics = {"top1": 1.0}
    registry.log_and_register(pipeline_params("served"), bundle.path, metrics, bundle.history, [], {})
    port = _free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registry.champion_uri("served"),
               "--env-manager", "local", "-h", HOST, "-p", str(port)]  # fmt: skip
    # The CLI starts `uvicorn` by name: the interpreter's bin folder must be on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "SIAMESE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://{HOST}:{port}"
        _wait_until_ready(base, process, log_path)
        yield base, bundle.gallery_images
    finally:
        _stop(process)


def test_served_champion_recognises_images_and_refuses_paths(server):
    base, gallery = server
    label, image = "digit 2", gallery["digit 2"][0]
    b64 = encode_image(image)
    for payload in (
        {"dataframe_split": {"columns": ["image"], "data": [[b64]]}},
        {"dataframe_records": [{"image": b64}, {"image": encode_image(gallery["digit 0"][0])}]},
    ):
        status, body = _post(f"{base}/invocations", payload)
        assert status == 200, body
        first = body["predictions"][0]
        assert set(first) == {"label", "distance", "top_k"}
        assert first["label"] == label and first["distance"] < 1e-4
        assert json.loads(first["top_k"])[0]["label"] == label
    assert body["predictions"][1]["label"] == "digit 0"

    status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["/etc/passwd"]]}})
    assert 400 <= status < 500
    assert "predictions" not in body and "not valid base64" in json.dumps(body)


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    base, gallery = server
    oversized = encode_image(os.urandom(MAX_IMAGE_BYTES + 1000))
    for payload, message in (
        ({"dataframe_split": {"columns": ["image"], "data": [[oversized]]}}, "byte limit"),
        ({"dataframe_split": {"columns": ["image"], "data": [[encode_image(b"plain text")]]}}, "readable image"),
        ({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, "image"),
    ):
        status, body = _post(f"{base}/invocations", payload)
        assert 400 <= status < 500, body
        assert message in json.dumps(body)
    status, body = _post(f"{base}/invocations", {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]})
    assert status == 200 and body["predictions"][0]["label"] == "digit 1"
