"""Serving the champion with `siamese serve` and with `mlflow models serve`, called over HTTP on the loopback
interface: the same protocol from both, and the limits only the project's own server can set."""

import http.client
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from PIL import Image

from pipelines import registry
from pipelines.pyfunc_model import encode_image

from support.http import HOST, free_port, post_json, stop_group, wait_until_ready
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

SERVER_PIDS: dict[str, int] = {}  # base URL -> the `mlflow models serve` process
MAX_IMAGE_BYTES = 200_000  # over the 9000x9000 PNG of the memory test
MAX_BODY_BYTES = 1_000_000  # siamese serve only
MAX_IMAGE_PIXELS = 16_000_000  # a 4000x4000 image is near it


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny champion in a fresh store: (tracking URI, bundle)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = use_sqlite_store(monkeypatch, tmp_path)
        bundle = make_tiny_bundle(tmp_path)
        register_bundle(pipeline_params("served"), bundle.path, {"top1": 1.0}, bundle.history, [], {},
                                  score_champion=logged_scorer())
    return uri, bundle


@pytest.fixture(scope="module", params=["siamese serve", "mlflow models serve"])
def server(request, registered, tmp_path_factory):
    """The champion served by one of the two servers; yields (base URL, gallery images, server name)."""
    uri, bundle = registered
    bin_dir = os.path.dirname(sys.executable)
    command = {
        "siamese serve": [os.path.join(bin_dir, "siamese"), "serve", "--model", registry.champion_uri("served")],
        "mlflow models serve": [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                registry.champion_uri("served"), "--env-manager", "local"],
    }[request.param]
    yield from _serve(tmp_path_factory.mktemp("serve"), command, uri, bundle, request.param)


def _serve(tmp_path, command, uri, bundle, name):
    port = free_port()
    log_path = tmp_path / "serve.log"
    # the memory tests' near-limit images take their time on a busy machine: no request here is shed for lateness
    # (shedding has its own server in tests/test_serving_load.py)
    (tmp_path / "params.yaml").write_text("serving:\n  deadline_ms: 300000\n")
    command = [*command, "--host", HOST, "--port", str(port)]
    # The MLflow CLI starts `uvicorn` by name: the interpreter's bin folder must be on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "SIAMESE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "SIAMESE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
           "SIAMESE_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its inference log goes under tmp_path
    try:
        base = f"http://{HOST}:{port}"
        wait_until_ready(base, process, log_path)
        SERVER_PIDS[base] = process.pid
        yield base, bundle.gallery_images, name
    finally:
        stop_group(process)


def test_served_champion_recognises_images_and_refuses_paths(server):
    base, gallery, name = server
    label, image = "digit 2", gallery["digit 2"][0]
    b64 = encode_image(image)
    for payload in (
        {"dataframe_split": {"columns": ["image"], "data": [[b64]]}},
        {"dataframe_records": [{"image": b64}, {"image": encode_image(gallery["digit 0"][0])}]},
    ):
        status, body = post_json(f"{base}/invocations", payload)
        assert status == 200, body
        first = body["predictions"][0]
        assert set(first) == {"label", "distance", "top_k"}  # no threshold in this bundle: no unknown score
        assert first["label"] == label and first["distance"] < 1e-4
        assert first["top_k"][0]["label"] == label  # structured JSON, not JSON inside a string
    assert body["predictions"][1]["label"] == "digit 0"

    status, body = post_json(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["/etc/passwd"]]}})
    assert status == 400 and "stack_trace" not in body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "row 0: 'image' is not valid base64; send the image bytes base64-encoded, not a path or URL"


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    base, gallery, name = server
    oversized = encode_image(os.urandom(MAX_IMAGE_BYTES + 1000))
    for payload, message in (
        ({"dataframe_split": {"columns": ["image"], "data": [[oversized]]}}, f"row 0: image of about {MAX_IMAGE_BYTES + 1000} bytes is over"),
        ({"dataframe_split": {"columns": ["image"], "data": [[encode_image(b"plain text")]]}},
         "row 0: not a readable image"),
    ):
        status, body = post_json(f"{base}/invocations", payload)
        assert status == 400 and "stack_trace" not in body, body
        assert body["message"].startswith(message) and "\n" not in body["message"]
    # the column is checked before the model sees the request (by MLflow's signature check, or ours)
    status, body = post_json(f"{base}/invocations", {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    assert status == 400 and "stack_trace" not in body
    assert {"mlflow models serve": "Model is missing inputs ['image']",
            "siamese serve": "the request needs a column 'image'"}[name] in body["message"]
    status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]})
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
    base, gallery, name = server
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")  # 81 megapixels in a small file
    huge = encode_image(buffer.getvalue())
    warm = {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]}
    assert post_json(f"{base}/invocations", warm)[0] == 200
    _, peak_before = _worker_memory(SERVER_PIDS[base])
    requests = [{"dataframe_records": [{"image": huge}, {"image": huge}]}] * 6
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda payload: post_json(f"{base}/invocations", payload), requests))
    now, peak_after = _worker_memory(SERVER_PIDS[base])
    print(f"{len(buffer.getvalue())} byte PNG of 9000x9000 pixels, {len(requests)} requests at once: "
          f"peak memory of the server {peak_before / 2**20:.0f} -> {peak_after / 2**20:.0f} MiB")
    for status, body in answers:
        assert status == 400 and "9000x9000 pixels, over the limit of" in body["message"], body
    assert peak_after - peak_before < 100 * 2**20
    assert post_json(f"{base}/invocations", warm)[0] == 200


def test_concurrent_near_limit_images_are_decoded_within_the_pixel_budget_and_memory_comes_back(server):
    """Six requests of three images just under the pixel limit at once: decoding holds the process-wide
    pixel budget (SIAMESE_MAX_DECODING_PIXELS, by default one image at the limit), so the server grows
    by about one decoded image, not eighteen, and gives it back."""
    base, gallery, name = server
    buffer = io.BytesIO()
    Image.new("RGB", (3990, 3990), (90, 140, 200)).save(buffer, format="PNG")  # 15.9 MP, 64 MB decoded
    near_limit = encode_image(buffer.getvalue())
    warm = {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]}
    assert post_json(f"{base}/invocations", warm)[0] == 200
    rss_before, peak_before = _worker_memory(SERVER_PIDS[base])
    requests = [{"dataframe_records": [{"image": near_limit}] * 3}] * 6
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda payload: post_json(f"{base}/invocations", payload), requests))
    rss_after, peak_after = _worker_memory(SERVER_PIDS[base])
    print(f"{name}: 6 requests of 3 images of 3990x3990 at once: peak {peak_before / 2**20:.0f} -> "
          f"{peak_after / 2**20:.0f} MiB, resident {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert [status for status, _ in answers] == [200] * 6, answers[0]
    assert peak_after - peak_before < 200 * 2**20  # 18 images decoded at once would take 1.1 GiB
    assert rss_after - rss_before < 100 * 2**20


@pytest.mark.parametrize("server", ["siamese serve"], indirect=True)
def test_a_body_over_the_limit_is_refused_before_it_is_parsed(server):
    base, gallery, _ = server
    image = encode_image(gallery["digit 1"][0])
    for _ in range(10):  # the client reads the 413 every time, not a broken pipe while it still sends
        status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"image": image}] * 4000})  # about 3 MB
        assert status == 413 and body["message"].startswith("request body of ")
        assert "SIAMESE_MAX_BODY_BYTES" in body["message"]

    # no Content-Length: the body arrives in chunks, refused once past the limit
    connection = http.client.HTTPConnection(HOST, int(base.rsplit(":", 1)[1]), timeout=60)
    chunks = (b'{"dataframe_records": [' + b"{\"image\": \"%s\"}, " % image.encode() * 200 for _ in range(20))
    try:
        connection.request("POST", "/invocations", body=chunks, headers={"Content-Type": "application/json"},
                           encode_chunked=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the client finished sending
    response = connection.getresponse()
    assert response.status == 413 and "over the limit of" in json.loads(response.read())["message"]
    connection.close()
    assert post_json(f"{base}/invocations", {"dataframe_records": [{"image": image}]})[0] == 200


@pytest.mark.parametrize("server", ["siamese serve"], indirect=True)
def test_deep_requests_and_huge_keys_get_a_short_400(server):
    base, gallery, _ = server
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = "k" * 500_000
    for payload, expected in ((deep, b"nested too deeply"), (json.dumps({huge: 1}).encode(), b"one key of"),
                              (json.dumps({"dataframe_split": {"columns": [huge], "data": [["x"]]}}).encode(),
                               b"needs a column 'image'")):
        request = urllib.request.Request(f"{base}/invocations", data=payload,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        answer = error.value.read()
        assert error.value.code == 400 and expected in answer and len(answer) < 600, answer[:600]
    status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"image": encode_image(gallery["digit 1"][0])}]})
    assert status == 200 and body["predictions"][0]["label"] == "digit 1"


def test_siamese_serve_refuses_a_version_whose_artifacts_were_swapped(registered, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app

    uri, bundle = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    code = next(store.rglob("served_model.py"))
    original = code.read_text()
    marker = tmp_path / "executed"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + original)
    try:
        out = CliRunner().invoke(app, ["serve", "--model", registry.champion_uri("served"), "--port", "1"])
    finally:
        code.write_text(original)
    assert out.exit_code == 1 and "differ from those registered" in out.output and not marker.exists()
    assert "Traceback" not in out.output


def test_siamese_serve_follows_its_alias_through_promote_and_rollback_without_a_failed_request(tmp_path, monkeypatch):
    """Load from four clients while the champion alias moves to version 2 and back: every request is answered,
    the answering version (X-Model-Version) follows the alias, and /version names it."""
    import threading

    uri = use_sqlite_store(monkeypatch, tmp_path)
    bundle = make_tiny_bundle(tmp_path)
    for _ in range(2):
        register_bundle(pipeline_params("rolled"), bundle.path, {"top1": 1.0}, bundle.history, [], {},
                        score_champion=logged_scorer())
    port, log_path = free_port(), tmp_path / "serve.log"
    command = [os.path.join(os.path.dirname(sys.executable), "siamese"), "serve", "--model", "models:/rolled@champion",
               "--no-log", "--reload-seconds", "1", "--host", HOST, "--port", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://{HOST}:{port}"
    image = encode_image(next(iter(bundle.gallery_images.values()))[0])
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            request = urllib.request.Request(f"{base}/invocations", method="POST", headers={
                "Content-Type": "application/json"}, data=json.dumps({"inputs": [image]}).encode())
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append((response.status, response.headers["X-Model-Version"]))
            except urllib.error.HTTPError as error:
                answers.append((error.code, None))

    def served_version(expected: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if answers and answers[-1][1] == expected:
                return
            time.sleep(0.2)
        pytest.fail(f"still not version {expected}: {answers[-3:]}\n{log_path.read_text()[-2000:]}")

    try:
        wait_until_ready(base, server, log_path)
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        served_version("1")
        registry.set_champion("rolled", "2", "a hot-reload test")
        served_version("2")
        registry.rollback("rolled", "back again")
        served_version("1")
        stop.set()
        for thread in clients:
            thread.join(60)
        with urllib.request.urlopen(f"{base}/version", timeout=10) as response:
            assert "models:/rolled@champion, version 1" in response.read().decode()
    finally:
        stop.set()
        stop_group(server)
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    versions = [version for _, version in answers]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes[0] == "1" and "2" in changes and changes[-1] == "1", changes
    assert "now serves version 2 (was 1)" in log_path.read_text()


def test_siamese_serve_batches_concurrent_requests_and_each_gets_its_own_answer(server):
    """32 concurrent requests of one or three images, one of them bad: every good request gets exactly the answer
    it gets alone, the bad one alone gets its 400, and the server recognised them in fewer forward passes."""
    base, gallery, name = server
    if name != "siamese serve":
        pytest.skip("micro-batching is siamese serve's")
    images = [paths[0] for paths in gallery.values()] + [paths[1] for paths in gallery.values()]
    requests = [[images[n % len(images)]] if n % 4 else [images[n % len(images)], images[(n + 1) % len(images)],
                                                          images[(n + 2) % len(images)]] for n in range(32)]
    alone = [post_json(f"{base}/invocations", {"inputs": [encode_image(p) for p in request]}) for request in requests]
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        before = json.loads(response.read())["batching"]
    bodies = [{"inputs": [encode_image(p) for p in request]} for request in requests] + [{"inputs": ["bm90IGFuIGltYWdl"]}]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: post_json(f"{base}/invocations", body), bodies))
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        after = json.loads(response.read())["batching"]
    for (status, batched), (status_alone, single) in zip(together[:-1], alone):  # row for row, to float rounding
        assert status == status_alone == 200
        assert [row["label"] for row in batched["predictions"]] == [row["label"] for row in single["predictions"]]
        assert [[k["label"] for k in row["top_k"]] for row in batched["predictions"]] == [
            [k["label"] for k in row["top_k"]] for row in single["predictions"]]
        assert [row["distance"] for row in batched["predictions"]] == pytest.approx(
            [row["distance"] for row in single["predictions"]], rel=1e-5, abs=1e-5)
    assert together[-1][0] == 400 and "row 0" in together[-1][1]["message"]
    assert after["requests"] - before["requests"] == 33  # the bad one is decoded in its batch and fails alone
    assert after["batches"] - before["batches"] < 32, (before, after)


def test_the_servers_answer_rows_are_those_of_the_pyfunc_frame():
    """siamese serve writes its rows without a DataFrame; they are the pyfunc model's rows exactly."""
    from pipelines.pyfunc_model import answer_frame, answer_records
    from siamese_core.gallery import Match

    for matches in ([Match("digit 1", 0.5, [("digit 1", 0.5), ("digit 2", 0.7)], "", 0.3),
                     Match("unknown", 0.9, [("digit 2", 0.9)], "", 0.8)],
                    [Match("digit 1", 0.25, [("digit 1", 0.25)])]):
        assert answer_records(matches) == answer_frame(matches).to_dict(orient="records")


def _post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST ``body`` as it is, with only ``headers`` (http.client adds no Content-Type of its own)."""
    connection = http.client.HTTPConnection(HOST, int(base.rsplit(":", 1)[1]), timeout=60)
    try:
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("server", ["siamese serve"], indirect=True)
def test_rows_in_the_wrong_form_get_one_line_naming_the_row_and_the_form_expected(server):
    base, gallery, _ = server
    image = encode_image(gallery["digit 1"][0])
    record = '{"image": "<base64>"}'
    for payload, message in (
        ({"inputs": [{"image": image}, "abc"]}, f"row 1 of 'inputs' is a string; every row must be a record like {record}"),
        ({"dataframe_records": [{"image": image}, [image]]},
         f"row 1 of 'dataframe_records' is a list; every row must be a record like {record}"),
        ({"instances": [image, {"image": image}]}, "row 1 of 'instances' is a record but row 0 is a string: send every "
         f"row as a base64 string, or every row as a record like {record}"),
        ({"dataframe_split": {"columns": ["image"], "data": [{"image": image}]}},
         "row 0 of 'dataframe_split' is a record (an object); its rows are lists of values in the order of 'columns' "
         "(send records as 'dataframe_records')"),
        ({"dataframe_split": {"columns": ["image"], "data": [image]}},
         "row 0 of 'dataframe_split' is a string; its rows are lists of values in the order of 'columns'"),
        ({"dataframe_split": {"columns": ["id", "image"], "data": [[1]]}},
         "row 0 of 'dataframe_split' has 1 values; 'columns' names 2"),
        ({"dataframe_split": [[image]]},
         """'dataframe_split' must be an object {"columns": ["image"], "data": [["<base64>"], ...]}, got a list"""),
        ({"inputs": {"image": {"a": image}}},
         "the column 'image' of 'inputs' is a record (an object); expected a list of base64 strings"),
        ({"dataframe_records": [{"image": image}, {"picture": image}]},
         "the request needs a column 'image' of base64-encoded images, got columns ['picture'] in row 1"),
        ({"inputs": 7}, "'inputs' is a number; expected a list of rows or an object of columns"),
    ):
        status, body = post_json(f"{base}/invocations", payload)
        assert (status, body["message"]) == (400, message), payload
    for payload in ({"inputs": [image]}, {"inputs": {"image": image}}, {"instances": [{"image": image}]},
                    {"dataframe_split": {"columns": ["id", "image"], "data": [[7, image]]}}):
        status, body = post_json(f"{base}/invocations", payload)
        assert status == 200 and body["predictions"][0]["label"] == "digit 1", (payload, body)


@pytest.mark.parametrize("server", ["siamese serve"], indirect=True)
def test_a_body_that_is_not_json_gets_a_415_saying_json_is_expected(server):
    """MLflow's own server also reads CSV and Parquet; this one refuses them in one line rather than read them as
    JSON. A request with no Content-Type at all is read as JSON."""
    base, gallery, _ = server
    image = encode_image(gallery["digit 1"][0])
    as_json = json.dumps({"inputs": [image]}).encode()
    for content_type, body in (("text/csv", f"image\n{image}\n".encode()), ("application/vnd.apache.parquet", b"PAR1"),
                               ("application/x-www-form-urlencoded", as_json)):  # curl -d without -H
        status, answer = _post(base, body, {"Content-Type": content_type})
        assert status == 415 and answer["message"] == (
            f"Content-Type '{content_type}' is not accepted: this server takes JSON only (Content-Type: "
            "application/json, an object with one key of ['dataframe_split', 'dataframe_records', 'inputs', "
            "'instances'])"), answer
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "Application/JSON"}, {}):
        status, answer = _post(base, as_json, headers)
        assert status == 200 and answer["predictions"][0]["label"] == "digit 1", (headers, answer)
