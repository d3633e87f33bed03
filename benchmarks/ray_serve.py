"""Serving throughput on Ray Serve (issue 26): the demo's recogniser as a Ray Serve deployment whose replicas batch the
images of concurrent requests into one forward pass (`@serve.batch`), to set beside `siamese serve` and nginx.

Each replica loads artifacts/bundle and answers POST /invocations ({"inputs": [base64 image, ...]} ->
{"predictions": [...]}) through the project's own functions (pipelines.pyfunc_model, siamese_core); its forward pass
runs on cores / replicas threads, as scale_out.py gives each `siamese serve` replica. For 1, 4, 8 and 16 concurrent
clients (benchmarks/load.py, its own process) sending single-image requests (and, with --multi, 8-image requests):
requests/s, images/s, p50/p95/p99 latency, errors, the CPU ms per request of all Ray processes (GCS, raylet, proxy,
controller, replicas, idle workers: this process's descendants) and their resident memory (summed RSS, which counts
pages they share more than once). Figures, not assertions: the machine is shared.
Needs Ray Serve, kept out of the project's environment (python3 -m venv .venv-ray, then .venv-ray/bin/pip install
-c constraints.txt -e . and .venv-ray/bin/pip install -c constraints.txt "ray[serve]"):

    .venv-ray/bin/python benchmarks/ray_serve.py [--seconds 8] [--replicas 1] [--multi]

Writes benchmarks/results/ray-serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import in_own_process  # noqa: E402
from served_demo import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ray-serve.json"
CLIENTS = (1, 4, 8, 16)
CORES = 2


@serve.deployment(max_ongoing_requests=128, logging_config={"enable_access_log": False})
class Recogniser:
    """The bundle's recogniser; a request's images wait in `recognise` to join those of other requests."""

    def __init__(self, bundle: str, tf_threads: int):
        from pipelines.params import ServingConfig
        from pipelines.serving import set_threads
        from siamese_core.recognizer import SiameseRecognizer

        set_threads(ServingConfig(tf_threads=tf_threads))  # as `siamese serve` sets them, before TensorFlow runs
        self.recognizer = SiameseRecognizer.load(bundle)

    async def __call__(self, request: Request):
        from pipelines.pyfunc_model import decode_base64_images
        from siamese_core.data import decode_image

        try:
            inputs = (await request.json())["inputs"]
            arrays = [decode_image(data, self.recognizer.input_size) for data in decode_base64_images(inputs)]
        except (ValueError, KeyError, TypeError) as exc:  # ImageError is a ValueError, as is bad JSON
            return JSONResponse({"error": str(exc)}, status_code=400)
        return {"predictions": await self.recognise(arrays)}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def recognise(self, requests: list[list]) -> list[list[dict]]:
        """The answers of several requests' images, from one `embed` call (off the event loop)."""
        images = [array for arrays in requests for array in arrays]
        rows = await asyncio.to_thread(self._answer, images) if images else []
        answers, start = [], 0
        for arrays in requests:
            answers.append(rows[start:start + len(arrays)])
            start += len(arrays)
        return answers

    def _answer(self, images: list) -> list[dict]:
        from pipelines.pyfunc_model import answer_records

        return answer_records(self.recognizer.match(self.recognizer.embed(images)))


def _ray_processes() -> dict[int, tuple[float, int]]:
    """CPU seconds and RSS bytes of each Ray process: everything this process started (ray.init starts the GCS and
    the raylet, which start the workers), run between loads, so the load generator is not among them."""
    figures = {}
    for process in psutil.Process().children(recursive=True):
        try:
            with process.oneshot():
                times = process.cpu_times()
                figures[process.pid] = (times.user + times.system, process.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load per (clients, request size)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas of the recogniser")
    parser.add_argument("--multi", action="store_true", help="also 8-image requests")
    args = parser.parse_args()
    from pipelines.pyfunc_model import encode_image

    images = [encode_image(p) for p in sorted((ROOT / "data" / "demo" / "test").glob("*/*.png"))[:64]]
    sizes = {"1 image": [json.dumps({"inputs": [i]}).encode() for i in images]}
    if args.multi:
        sizes["8 images"] = [json.dumps({"inputs": images[n:n + 8]}).encode() for n in range(0, 56, 8)]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the replicas inherit it
    started = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False, logging_level="warning")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = Recogniser.options(num_replicas=args.replicas, ray_actor_options={"num_cpus": CORES / args.replicas})
        serve.run(app.bind(str(ROOT / "artifacts" / "bundle"), max(1, CORES // args.replicas)),
                  route_prefix="/invocations")
        results: dict = {"ray": ray.__version__, "replicas": args.replicas,
                         "startup_s": round(time.perf_counter() - started, 1), "rows": []}
        url = f"http://127.0.0.1:{port}/invocations"
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            in_own_process(url, sizes["1 image"], 4, 2, work)  # warm up
            for size, bodies in sizes.items():
                for clients in CLIENTS:
                    before = _ray_processes()
                    row = {"request": size, "clients": clients, **in_own_process(url, bodies, clients, args.seconds, work)}
                    row.pop("versions")
                    after = _ray_processes()
                    used = sum(cpu - before.get(pid, (0.0, 0))[0] for pid, (cpu, _) in after.items())
                    row["images_per_s"] = round(row["requests_per_s"] * (8 if size == "8 images" else 1), 1)
                    row["cpu_ms_per_request"] = round(1000 * used / max(row["requests"], 1), 2)
                    row["rss_mb"] = round(sum(rss for _, rss in after.values()) / 2**20)
                    row["ray_processes"] = len(after)
                    results["rows"].append(row)
                    print("ray serve", row, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("ray", "replicas", "startup_s", "machine")}, indent=1))


if __name__ == "__main__":
    main()
