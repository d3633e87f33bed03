"""Serving the champion with `mlflow models serve` and calling it over HTTP on the loopback interface."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mlflow_fixtures import logged_scorer, make_tiny_bundle, pipeline_params, use_sqlite_store
from PIL import Image

from pipelines import registry
from pipelines.pyfunc_model import encode_image

HOST = "127.0.0.1"
SERVER_PIDS: dict[str, int] = {}  # base URL -> the `mlflow models serve` process
STARTUP_TIMEOUT_S = 120
MAX_IMAGE_BYTES = 200_000  # over the 9000x9000 PNG of the memory test


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
    registry.log_and_register(pipeline_params("served"), bundle.path, metrics, bundle.history, [], {},
                                       score_champion=logged_scorer())
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
        SERVER_PIDS[base] = process.pid
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
        assert set(first) == {"label", "distance", "top_k"}  # no threshold in this bundle: no unknown score
        assert first["label"] == label and first["distance"] < 1e-4
        assert json.loads(first["top_k"])[0]["label"] == label
    assert body["predictions"][1]["label"] == "digit 0"

    status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["/etc/passwd"]]}})
    assert status == 400 and "stack_trace" not in body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "row 0: 'image' is not valid base64; send the image bytes base64-encoded, not a path or URL"


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    base, gallery = server
    oversized = encode_image(os.urandom(MAX_IMAGE_BYTES + 1000))
    for payload, message in (
        ({"dataframe_split": {"columns": ["image"], "data": [[oversized]]}}, f"row 0: image of about {MAX_IMAGE_BYTES + 1000} bytes is over"),
        ({"dataframe_split": {"columns": ["image"], "data": [[encode_image(b"plain text")]]}},
         "row 0: not a readable image"),
    ):
        status, body = _post(f"{base}/invocations", payload)
        assert status == 400 and "stack_trace" not in body, body
        assert body["message"].startswith(message) and "\n" not in body["message"]
    # MLflow checks the signature before the model sees the request: its message, still without a trace
    status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    assert status == 400 and "stack_trace" not in body and "Model is missing inputs ['image']" in body["message"]
    status, body = _post(f"{base}/invocations", {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]})
    assert status == 200 and body["predictions"][0]["label"] == "digit 1"


def _worker_memory(server_pid: int) -> tuple[int, int]:
    """The serving processes' summed resident memory now, and summed peak since they started, in bytes."""
    processes = [psutil.Process(server_pid), *psutil.Process(server_pid).children(recursive=True)]
    now = peak = 0
    for process in processes:
        status = Path(f"/proc/{process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        now += int(fields["VmRSS"].split()[0]) * 1024
        peak += int(fields["VmHWM"].split()[0]) * 1024
    return now, peak


def test_concurrent_huge_images_are_refused_before_decoding_and_memory_stays_flat(server):
    base, gallery = server
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")  # 81 megapixels in a small file
    huge = encode_image(buffer.getvalue())
    warm = {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]}
    assert _post(f"{base}/invocations", warm)[0] == 200
    _, peak_before = _worker_memory(SERVER_PIDS[base])
    requests = [{"dataframe_records": [{"image": huge}, {"image": huge}]}] * 6
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda payload: _post(f"{base}/invocations", payload), requests))
    now, peak_after = _worker_memory(SERVER_PIDS[base])
    print(f"{len(buffer.getvalue())} byte PNG of 9000x9000 pixels, {len(requests)} requests at once: "
          f"peak memory of the server {peak_before / 2**20:.0f} -> {peak_after / 2**20:.0f} MiB")
    for status, body in answers:
        assert status == 400 and "9000x9000 pixels, over the limit of" in body["message"], body
    assert peak_after - peak_before < 100 * 2**20
    assert _post(f"{base}/invocations", warm)[0] == 200
