"""Serving throughput (issue 26): `siamese serve` (micro-batching) beside `mlflow models serve`, in the same run, with
the network's own batch-64 throughput in this process as the limit.

The demo's bundle (artifacts/bundle) is registered in a temporary MLflow store. For each server and each number of
concurrent clients (1, 4, 8, 16), every client sends single-image requests (and, with --multi, 8-image requests)
for a fixed time. Printed and written: requests/s, images/s, p50/p95/p99 latency, errors, the server's CPU seconds
per request and its resident memory. Figures, not assertions: the machine is shared.
Writes benchmarks/results/serving.json (serving-seed.json with --architecture seed: the seed's ResNet50 at 200 px).
Single-image requests come from benchmarks/load.py, in its own process, over keep-alive connections.

    python benchmarks/serving.py [--seconds 8] [--multi] [--architecture demo|seed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from load import in_own_process
from served_demo import free_port, register_demo_bundle, seed_bundle, wait_for_ping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
CLIENTS = (1, 4, 8, 16)


def _network_limit(bundle: Path) -> float:
    """Images per second of the bundle's network at batch 64, in this process (no HTTP, no decoding)."""
    import numpy as np

    from siamese_core.recognizer import SiameseRecognizer

    network = SiameseRecognizer.load(bundle).embedding
    size = int(network.input_shape[1])
    batch = np.random.default_rng(0).integers(0, 255, (64, size, size, 3)).astype("float32")
    network.predict_on_batch(batch)
    started, rounds = time.perf_counter(), 0
    while time.perf_counter() - started < 5:
        network.predict_on_batch(batch)
        rounds += 1
    return 64 * rounds / (time.perf_counter() - started)


def _in_process_rate(bundle: Path, images: list[str]) -> float:
    """Single-image requests per second of the library's own path in this process: `recognizer.predict` on the
    image bytes, one after another (no HTTP)."""
    import base64

    from siamese_core.recognizer import SiameseRecognizer

    recognizer = SiameseRecognizer.load(bundle)
    data = [base64.b64decode(image) for image in images]
    recognizer.predict(data[:1])
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < 5:
        recognizer.predict([data[done % len(data)]])
        done += 1
    return done / (time.perf_counter() - started)


def _server(name: str, tracking: str, work: Path, port: int) -> subprocess.Popen:
    command = {
        "siamese serve": [sys.executable, "-m", "pipelines.cli", "serve", "--model", "models:/bench@champion",
                          "--no-log", "--port", str(port)],
        "mlflow models serve": [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/bench@champion",
                                "--env-manager", "local", "--port", str(port)],
    }[name]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load per (server, clients, request size)")
    parser.add_argument("--multi", action="store_true", help="also 8-image requests")
    parser.add_argument("--architecture", choices=("demo", "seed"), default="demo",
                        help="demo: the demo's champion (artifacts/bundle); seed: ResNet50 at 200 px")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.pyfunc_model import encode_image

    images = [encode_image(p) for p in sorted((ROOT / "data" / "demo" / "test").glob("*/*.png"))[:64]]
    sizes = {"1 image": [json.dumps({"inputs": [i]}).encode() for i in images]}
    if args.multi:
        sizes["8 images"] = [json.dumps({"inputs": images[n:n + 8]}).encode() for n in range(0, 56, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = ROOT / "artifacts" / "bundle" if args.architecture == "demo" else seed_bundle(work)
        results: dict = {"architecture": args.architecture, "network_batch64_images_per_s": round(_network_limit(bundle), 1),
                         "in_process_single_image_per_s": round(_in_process_rate(bundle, images), 1), "servers": {}}
        tracking = register_demo_bundle(work, bundle)
        for name in ("siamese serve", "mlflow models serve"):
            port = free_port()
            server = _server(name, tracking, work, port)
            try:
                wait_for_ping(port)
                url = f"http://127.0.0.1:{port}/invocations"
                in_own_process(url, sizes["1 image"], 4, 2, work)  # warm up
                family = [server_process := psutil.Process(server.pid), *server_process.children(recursive=True)]
                rows = []
                for size, bodies in sizes.items():
                    for clients in CLIENTS:
                        cpu = sum(p.cpu_times().user + p.cpu_times().system for p in family)
                        row = {"request": size, "clients": clients, **in_own_process(url, bodies, clients, args.seconds, work)}
                        row.pop("versions")
                        used = sum(p.cpu_times().user + p.cpu_times().system for p in family) - cpu
                        row["images_per_s"] = round(row["requests_per_s"] * (8 if size == "8 images" else 1), 1)
                        row["cpu_ms_per_request"] = round(1000 * used / max(row["requests"], 1), 2)
                        row["rss_mb"] = round(sum(p.memory_info().rss for p in family) / 2**20)
                        rows.append(row)
                        print(name, row, flush=True)
                results["servers"][name] = rows
            finally:
                os.killpg(server.pid, 15)
                server.wait(30)
    limit = results["network_batch64_images_per_s"]
    for rows in results["servers"].values():
        for row in rows:
            row["share_of_network_limit"] = round(row["images_per_s"] / limit, 3)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    out = RESULTS if args.architecture == "demo" else RESULTS.with_name("serving-seed.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({key: results[key] for key in ("network_batch64_images_per_s", "in_process_single_image_per_s")}))


if __name__ == "__main__":
    main()
