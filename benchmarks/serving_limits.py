"""Serving memory under hostile load, with the limits on and lifted, in one run (issue 22, item 9).

Registers an untrained small CNN over a few generated images in a temporary SQLite store, starts
`siamese serve` on it twice (the default decoding budget, then the budget lifted) and measures the
server's resident and peak memory (VmRSS, VmHWM of its process) for:

- six concurrent requests of three images just under the 40 MP pixel limit (small PNG files);
- a 189 MiB request body, refused from its Content-Length, and the same body sent in chunks.

Figures, not assertions: the machine is shared. Writes benchmarks/results/serving-limits.json.

    python benchmarks/serving_limits.py
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving-limits.json"
NEAR_LIMIT_SIDE = 6300  # 39.7 MP, under the default 40 MP per image
BODY_BYTES = 189 * 2**20


def _register(root: Path) -> str:
    """An untrained tiny recogniser registered as champion of 'bench' in a SQLite store under ``root``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from pipelines import registry
    from pipelines.params import PipelineParams
    from pipelines.tracking import pipeline_run
    from siamese_core.config import apply_overrides
    from siamese_core.data import scan_folder
    from siamese_core.model import initial_embedding_model
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / "images" / f"class {label}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    params = apply_overrides(PipelineParams(), {"weights": None, "backbone": "small_cnn", "input_size": 32,
                                                "head_units": [16], "embedding_dim": 8,
                                                "register.model_name": "bench"})
    embedding = initial_embedding_model(params.core())
    recognizer = SiameseRecognizer(embedding, build_gallery(embedding, scan_folder(root / "images")),
                                   params.core())
    bundle = recognizer.save(root / "bundle")
    with pipeline_run(params) as scope:
        registry.log_and_register(scope.run, params, bundle, {"top1": 1.0}, [], {}, score_champion=lambda champion: None)
    return uri


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory(pid: int) -> tuple[float, float]:
    """Resident and peak memory of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _post(base: str, body: bytes) -> int:
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _serve(uri: str, env: dict, log: Path):
    port = _free_port()
    siamese = Path(sys.executable).parent / "siamese"
    process = subprocess.Popen([str(siamese), "serve", "--model", "models:/bench@champion", "--port", str(port)],
                               env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2)
            return process, base
        except OSError:
            if process.poll() is not None:
                raise SystemExit(log.read_text()[-2000:]) from None
            time.sleep(0.5)
    raise SystemExit("server did not start")


def _concurrent_near_limit(base: str, pid: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (NEAR_LIMIT_SIDE, NEAR_LIMIT_SIDE), (90, 140, 200)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    body = json.dumps({"dataframe_records": [{"image": image}] * 3}).encode()
    rss_before, peak_before = _memory(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: _post(base, body), range(6)))
    seconds = time.perf_counter() - start
    time.sleep(1)
    rss_after, peak_after = _memory(pid)
    return {"file_bytes": len(buffer.getvalue()), "statuses": statuses, "seconds": round(seconds, 2),
            "peak_growth_mib": round(peak_after - peak_before), "resident_after_minus_before_mib": round(rss_after - rss_before)}


def _huge_body(base: str, pid: int) -> dict:
    body = b'{"dataframe_records": [' + b'{"image": "' + b"A" * (BODY_BYTES - 40) + b'"}]}'
    out = {}
    for mode in ("content-length", "chunked"):
        _, peak_before = _memory(pid)
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        start = time.perf_counter()
        try:
            if mode == "chunked":
                chunks = (body[i:i + 2**20] for i in range(0, len(body), 2**20))
                connection.request("POST", "/invocations", body=chunks, encode_chunked=True)
            else:
                connection.request("POST", "/invocations", body=body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        message = json.loads(response.read())["message"]
        seconds = time.perf_counter() - start
        _, peak_after = _memory(pid)
        out[mode] = {"status": response.status, "seconds": round(seconds, 3),
                     "peak_growth_mib": round(peak_after - peak_before), "message": message}
        connection.close()
    return out


def main() -> None:
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "near_limit_image": f"{NEAR_LIMIT_SIDE}x{NEAR_LIMIT_SIDE} RGB PNG, 3 per request, 6 requests at once",
                     "body_bytes": BODY_BYTES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = _register(root)
        for name, env in (("limits on (defaults)", {}),
                          ("decoding budget lifted", {"SIAMESE_MAX_DECODING_PIXELS": str(10**12),
                                                      "SIAMESE_MAX_BODY_BYTES": str(2**31)})):
            process, base = _serve(uri, env, root / f"{len(results)}.log")
            try:
                _post(base, json.dumps({"dataframe_records": [{"image": base64.b64encode(
                    (root / "images" / "class 0" / "0.png").read_bytes()).decode()}]}).encode())
                rss, _ = _memory(process.pid)
                results[name] = {"resident_at_start_mib": round(rss),
                                 "concurrent_near_limit": _concurrent_near_limit(base, process.pid)}
                if not env:
                    results[name]["body_189_mib"] = _huge_body(base, process.pid)
            finally:
                process.terminate()
                process.wait(30)
            print(name, json.dumps(results[name], indent=1))
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
