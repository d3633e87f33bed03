"""`siamese serve` under load and abuse, on one real server with small limits: work it cannot answer in time is shed
at once with 503 and Retry-After, a heavy request holds nothing but its own decoding, a request's head and body are
bounded in size and time, open connections are bounded, a client gone mid-body is a counted event, /ready says why it
refuses, /metrics says all of it, and SIGTERM drains, writes the answered requests' records and says so."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from pipelines import registry
from pipelines.pyfunc_model import encode_image

from support.http import HOST, exchange, free_port, metric_values, post_json, stop_group, wait_until_ready
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

QUEUE_IMAGES = 64
MAX_CONNECTIONS = 16
PARAMS = f"""serving:
  queue_images: {QUEUE_IMAGES}
  deadline_ms: 2000
  decode_threads: 2
  max_header_bytes: 4096
  header_seconds: 2
  body_seconds: 2
  max_connections: {MAX_CONNECTIONS}
  drain_seconds: 30
monitoring:
  flush_seconds: 3600
"""


class Server:
    """The running server: its base URL, port, process, folder and log."""

    def __init__(self, tmp_path: Path, uri: str, gallery: dict):
        self.folder, self.gallery, self.port = tmp_path, gallery, free_port()
        self.base, self.log = f"http://{HOST}:{self.port}", tmp_path / "serve.log"
        (tmp_path / "params.yaml").write_text(PARAMS)
        command = [os.path.join(os.path.dirname(sys.executable), "siamese"), "serve", "--model",
                   registry.champion_uri("loaded"), "--host", HOST, "--port", str(self.port)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
               "SIAMESE_MAX_DECODING_PIXELS": "64000000"}  # four near-limit images decode at once
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until_ready(self.base, self.process, self.log)

    def small(self) -> tuple[int, dict]:
        return post_json(f"{self.base}/invocations", {"inputs": [encode_image(self.gallery["digit 1"][0])]})

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.base}{path}", timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for(self, check, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        pytest.fail(f"{what}\n{self.log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("load")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = use_sqlite_store(monkeypatch, tmp_path)
        bundle = make_tiny_bundle(tmp_path)
        register_bundle(pipeline_params("loaded"), bundle.path, {"top1": 1.0}, bundle.history, [], {},
                        score_champion=logged_scorer())
    (tmp_path / "server").mkdir()
    served = Server(tmp_path / "server", uri, bundle.gallery_images)
    yield served
    stop_group(served.process)


@pytest.fixture(scope="module")
def near_limit() -> str:
    """A 3990x3990 PNG (16 MP, a small file that takes a while to decode), base64-encoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (3990, 3990), (90, 140, 200)).save(buffer, format="PNG")
    return encode_image(buffer.getvalue())


def _in_background(server: Server, images: list[str]) -> tuple[threading.Thread, list]:
    """Send one request of ``images`` from a thread; its (status, body, headers, when answered) lands in the list."""
    answered: list = []

    def send():
        request = urllib.request.Request(f"{server.base}/invocations", data=json.dumps({"inputs": images}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answered.append((response.status, json.loads(response.read()), response.headers, time.monotonic()))
        except urllib.error.HTTPError as error:
            answered.append((error.code, json.loads(error.read()), error.headers, time.monotonic()))

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answered


def _queued(server: Server) -> float:
    return metric_values(server.base)["siamese_queue_images"]


def test_a_heavy_request_holds_only_its_own_decoding_and_is_cut_at_its_deadline(server, near_limit):
    """48 near-limit images (seconds of decoding) in flight: one-image requests meanwhile are answered, every one
    before it; the heavy one is answered 503 with Retry-After once its deadline from arrival (2 s) has passed, having
    decoded part of its images, not all of them (the hostile test's request held the recogniser 32 s)."""
    heavy, answered = _in_background(server, [near_limit] * 48)
    server.wait_for(lambda: _queued(server) >= 48, "the heavy request was not taken on")
    smalls = [server.small() for _ in range(5)]
    done = time.monotonic()
    heavy.join(120)
    assert [status for status, _ in smalls] == [200] * 5
    assert all(body["predictions"][0]["label"] == "digit 1" for _, body in smalls)
    status, body, headers, when = answered[0]
    assert when > done  # the small ones did not wait for it
    assert status == 503 and body["error_code"] == "TEMPORARILY_UNAVAILABLE", body
    assert body["message"].startswith("stopped at image ") and "of 48" in body["message"], body
    assert int(headers["Retry-After"]) >= 1


def test_work_past_the_queue_is_shed_at_once_ready_says_why_and_stats_count_only_accepted_work(server, near_limit):
    before = json.loads(server.get("/stats")[1])["batching"]
    assert server.get("/ready") == (200, "ready\n")
    heavy, answered = _in_background(server, [near_limit] * QUEUE_IMAGES)
    server.wait_for(lambda: server.get("/ready")[0] == 503, "/ready did not refuse with a full queue")
    assert server.get("/ready") == (503, f"not ready: {QUEUE_IMAGES} images taken on, the most serving.queue_images "
                                         "allows\n")
    assert server.get("/ping")[0] == 200  # alive all the same
    status, body = server.small()
    assert status == 503 and "serving.queue_images" in body["message"], body
    over_rows = post_json(f"{server.base}/invocations", {"inputs": [encode_image(server.gallery["digit 1"][0])] * 65})
    assert over_rows[0] == 400 and over_rows[1]["message"].startswith("65 images in one request, over the limit of 64")
    heavy.join(120)
    assert answered[0][0] == 503  # cut at its deadline
    after = json.loads(server.get("/stats")[1])["batching"]
    assert after["requests"] - before["requests"] == 1 and after["images"] - before["images"] == QUEUE_IMAGES
    assert after["shed"] - before["shed"] == 2  # the small one at once, the heavy one at its deadline
    server.wait_for(lambda: server.get("/ready") == (200, "ready\n"), "/ready still refusing")


def test_a_shed_request_carries_retry_after(server, near_limit):
    heavy, _ = _in_background(server, [near_limit] * QUEUE_IMAGES)
    server.wait_for(lambda: _queued(server) >= QUEUE_IMAGES, "the heavy request was not taken on")
    request = urllib.request.Request(f"{server.base}/invocations", method="POST", headers={
        "Content-Type": "application/json", "X-Request-Id": "shed-1"},
        data=json.dumps({"inputs": [encode_image(server.gallery["digit 1"][0])]}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    heavy.join(120)
    assert refused.value.code == 503 and int(refused.value.headers["Retry-After"]) >= 1
    assert refused.value.headers["X-Request-Id"] == "shed-1"


def test_a_request_head_over_its_size_or_time_and_a_slow_body_are_cut(server):
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, answer = exchange(HOST, server.port, head + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert status == 431 and b"serving.max_header_bytes" in answer
    status, answer = exchange(HOST, server.port, head)  # the head never ends
    assert status == 408 and b"serving.header_seconds" in answer
    status, answer = exchange(HOST, server.port, head + b"Content-Length: 1000\r\n\r\n", b'{"inputs": [')
    assert status == 408 and b"serving.body_seconds" in answer and b"connection: close" in answer.lower()
    assert server.small()[0] == 200
    values = metric_values(server.base)
    assert values['siamese_refused_connections_total{status="431"}'] >= 1
    assert values['siamese_refused_connections_total{status="408"}'] >= 1


def test_open_connections_are_bounded(server):
    idle = [socket.create_connection((HOST, server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        status, answer = exchange(HOST, server.port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        for sock in idle:
            sock.close()
    assert status == 503
    server.wait_for(lambda: server.get("/ping")[0] == 200, "the server did not take connections again")


def test_clients_gone_mid_body_are_counted_quietly(server):
    before = metric_values(server.base).get("siamese_client_disconnects_total", 0.0)
    for _ in range(30):
        exchange(HOST, server.port, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n", b'{"inputs": ["', then_wait=False)
    server.wait_for(lambda: metric_values(server.base).get("siamese_client_disconnects_total", 0.0) - before == 30,
                    "30 clients gone mid-body were not counted")
    log = server.log.read_text()
    assert "Traceback" not in log and "prediction failed" not in log
    assert log.count("went away before its request's body arrived") == 1  # one line, not thirty


def test_metrics_report_requests_latency_batches_queue_version_and_the_log(server):
    for _ in range(3):
        assert server.small()[0] == 200
    values = metric_values(server.base)
    assert values['siamese_requests_total{status="200"}'] >= 3
    assert values['siamese_requests_total{status="503"}'] >= 1 and values['siamese_shed_requests_total{reason="queue"}'] >= 1
    assert values['siamese_request_errors_total{status="400"}'] >= 1  # the request over the row limit
    assert values["siamese_request_seconds_count"] >= 3 and values["siamese_request_seconds_sum"] > 0
    assert values["siamese_batch_images_count"] >= 3 and values["siamese_queue_images"] == 0
    assert values['siamese_serving_version{model="models:/loaded@champion",role="champion",version="1"}'] == 1
    assert values['siamese_log_records_written_total{role="champion"}'] == 0  # flushed hourly here: see the drain
    assert values['siamese_log_records_dropped_total{role="champion"}'] == 0


def test_sigterm_drains_writes_the_answered_records_says_so_and_exits(server, near_limit):
    """Last: the server stops. Requests answered before SIGTERM wait in the log's queue (flushed hourly here); a
    request in flight at SIGTERM is answered, not reset; every answered image has its record written, under the
    request id its client sent."""
    answered = sum(1 for _ in range(4) if server.small()[0] == 200)
    request = urllib.request.Request(f"{server.base}/invocations", method="POST", headers={
        "Content-Type": "application/json", "X-Request-Id": "walk-1"},
        data=json.dumps({"inputs": [encode_image(server.gallery["digit 0"][0])]}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        answered += response.status == 200
    in_flight, late = _in_background(server, [near_limit] * 8)
    server.wait_for(lambda: _queued(server) >= 8, "the last request was not taken on")
    os.killpg(server.process.pid, signal.SIGTERM)
    in_flight.join(120)
    assert server.process.wait(60) == 0
    assert late and late[0][0] in (200, 503)  # answered, not reset
    answered += 8 if late[0][0] == 200 else 0
    stopped = [line for line in server.log.read_text().splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped: drained 1 requests, flushed "), stopped
    records = ds.dataset(server.folder / "logs" / "inference", format="parquet", partitioning="hive").to_table()
    assert records.num_rows >= answered and f"flushed {records.num_rows} log records" in stopped[0]
    assert "walk-1" in records.column("request_id").to_pylist()  # the client's id, passed along to the log


def test_the_uvicorn_internals_the_limits_and_the_drain_rely_on_are_there():
    """GuardedProtocol overrides uvicorn's httptools protocol callbacks; serve() relies on uvicorn raising the signal
    it drained for again once it returns. An upgrade that moves either fails here, by name."""
    import inspect

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    for hook in ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_headers_complete",
                 "on_message_complete"):
        assert callable(getattr(HttpToolsProtocol, hook)), hook
    assert "self.transport" in inspect.getsource(HttpToolsProtocol.connection_made)
    assert "signal.raise_signal" in inspect.getsource(uvicorn.Server.capture_signals)
    assert "timeout_graceful_shutdown" in inspect.getsource(uvicorn.Server.shutdown)
