"""What logging every answer costs a served model (issue 25): p50 latency and requests per second at 8 concurrent
clients, with the inference log on and off, in the same run.

The demo's bundle (artifacts/bundle, from `dvc repro`) is registered in a temporary MLflow store and served by
`siamese serve`, once with `--no-log` and once logging to a local folder, alternating (off, on, off, on) so a
drift of the machine's load hits both alike. Each client sends one demo test image per request. Figures, not
assertions: the machine is shared. Writes benchmarks/results/inference-log.json.

    python benchmarks/inference_log.py [--requests 250] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from served_demo import free_port, register_demo_bundle, wait_for_ping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "inference-log.json"
CLIENTS = 8
FLUSH_SECONDS = 5  # params.yaml's monitoring.flush_seconds: a load of 250 requests per client outlasts several


def _ask(url: str, body: bytes) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return 1000 * (time.perf_counter() - started)


def _round(tracking: str, work: Path, logging_on: bool, bodies: list[bytes], requests: int) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--model", "models:/bench@champion", "--port", str(port),
               "--params", str(work / "params.yaml"), "--log" if logging_on else "--no-log"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(work / "serve.log", "ab") as log:
        server = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_for_ping(port)
        for body in bodies[:16]:  # warm up
            _ask(url, body)
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            latencies = list(pool.map(lambda n: _ask(url, bodies[n % len(bodies)]), range(CLIENTS * requests)))
        elapsed = time.perf_counter() - started
        time.sleep(FLUSH_SECONDS + 2)  # the last records reach their file
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
            stats = json.loads(response.read())["inference_log"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    return {"logging": logging_on, "p50_ms": round(statistics.median(latencies), 2),
            "p95_ms": round(statistics.quantiles(latencies, n=20)[18], 2),
            "requests_per_s": round(len(latencies) / elapsed, 2), "log": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=250, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (off, on)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.pyfunc_model import encode_image

    images = sorted((ROOT / "data" / "demo" / "test").glob("*/*.png"))[:64]
    bodies = [json.dumps({"dataframe_records": [{"image": encode_image(p)}]}).encode() for p in images]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["monitoring"].update(log_uri=str(work / "log"), flush_seconds=FLUSH_SECONDS)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        tracking = register_demo_bundle(work)
        rounds = [_round(tracking, work, on, bodies, args.requests) for _ in range(args.rounds) for on in (False, True)]
    off = [r for r in rounds if not r["logging"]]
    on = [r for r in rounds if r["logging"]]
    summary = {
        "p50_ms_off": statistics.median(r["p50_ms"] for r in off), "p50_ms_on": statistics.median(r["p50_ms"] for r in on),
        "rps_off": statistics.median(r["requests_per_s"] for r in off),
        "rps_on": statistics.median(r["requests_per_s"] for r in on)}
    summary["p50_ratio_on_off"] = round(summary["p50_ms_on"] / summary["p50_ms_off"], 3)
    summary["rps_ratio_on_off"] = round(summary["rps_on"] / summary["rps_off"], 3)
    expected = 16 + CLIENTS * args.requests
    assert all(r["log"]["written"] == expected for r in on), [r["log"] for r in on]  # every answer logged
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "clients": CLIENTS,
              "requests_per_client": args.requests, "image": "demo test drawings, 32 px PNG, one per request",
              "rounds": rounds, "summary": summary}
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
