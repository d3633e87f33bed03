"""`siamese serve` overloaded (issue 34, item 4): 64 clients, each sending requests of 8 images in turn on its own
keep-alive connection for 30 s, against a demo-like tiny model (the fast-cpu network, untrained, with a gallery of the
demo's training images) served with params.yaml's defaults (serving.queue_images, serving.deadline_ms).

Reports the p50/p95/p99 latency of the accepted requests (answered 200) against the deadline, the share shed (503 with
Retry-After), other errors, the server's resident memory at the start, middle and end of the load, what /metrics
counted, and the one line the server prints when SIGTERM drains it. Figures, not assertions: the machine is shared.
Writes benchmarks/results/overload.json.

    python benchmarks/overload.py [--clients 64] [--images 8] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served_demo import ROOT, free_port, register_demo_bundle, wait_for_ping  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "overload.json"


def demo_like_bundle(folder: Path) -> Path:
    """The fast-cpu network (untrained: the cost is the same) with a gallery of the demo's training images."""
    from siamese_core.config import Config, apply_overrides
    from siamese_core.data import scan_folder
    from siamese_core.model import initial_embedding_model
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    config = apply_overrides(Config(), {"weights": None, "backbone": "small_cnn", "input_size": 56})
    network = initial_embedding_model(config)
    gallery = build_gallery(network, scan_folder(ROOT / "data" / "demo" / "train"), config.evaluate)
    return SiameseRecognizer(network, gallery, config).save(folder / "bundle")


def request_body(images: int) -> bytes:
    """One request of ``images`` of the demo's test images, base64-encoded."""
    import base64

    paths = sorted((ROOT / "data" / "demo" / "test").rglob("*.png"))[:images]
    return json.dumps({"inputs": [base64.b64encode(p.read_bytes()).decode() for p in paths]}).encode()


async def _client(port: int, body: bytes, stop: float, latencies: list[float], statuses: collections.Counter) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    try:
        while time.monotonic() < stop:
            started = time.monotonic()
            writer.write(head + body)
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            await reader.readexactly(int(headers.get("content-length", 0)))
            status = lines[0].split(" ")[1]
            statuses[status] += 1
            if status == "200":
                latencies.append(1000 * (time.monotonic() - started))
            elif status == "503":  # as a well-behaved client does: wait what Retry-After says
                await asyncio.sleep(float(headers.get("retry-after", 1)))
    except (OSError, asyncio.IncompleteReadError):
        statuses["connection lost"] += 1
    finally:
        writer.close()


def _rss_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return round(int(fields["VmRSS"].split()[0]) / 1024, 1)


async def _load(port: int, pid: int, body: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    rss = {"start": _rss_mib(pid)}
    stop = time.monotonic() + seconds
    load = asyncio.gather(*(_client(port, body, stop, latencies, statuses) for _ in range(clients)))
    await asyncio.sleep(seconds / 2)
    rss["middle"] = _rss_mib(pid)
    await load
    rss["end"] = _rss_mib(pid)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    answered = sum(statuses.values())
    return {"accepted_p50_ms": round(cuts[49], 1), "accepted_p95_ms": round(cuts[94], 1),
            "accepted_p99_ms": round(cuts[98], 1), "accepted_max_ms": round(max(latencies, default=0), 1),
            "responses": answered, "statuses": dict(statuses),
            "share_shed": round(statuses["503"] / answered, 3) if answered else None,
            "accepted_per_s": round(len(latencies) / seconds, 1), "rss_mib": rss}


def _metrics(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    wanted = ("siamese_requests_total", "siamese_shed_requests_total", "siamese_batch_images_count",
              "siamese_batch_images_sum", "siamese_log_records_written_total", "siamese_log_records_dropped_total")
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if sample.name in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    from pipelines.params import ServingConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        uri = register_demo_bundle(work, demo_like_bundle(work))
        port = free_port()
        log = work / "serve.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([str(Path(sys.executable).parent / "siamese"), "serve", "--model",
                                       "models:/bench@champion", "--port", str(port)], cwd=work, stdout=out,
                                      stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                                                     "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            wait_for_ping(port)
            body = request_body(args.images)
            for _ in range(5):  # warm up
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}),
                    timeout=60).read()
            figures = asyncio.run(_load(port, server.pid, body, args.clients, args.seconds))
            figures["metrics"] = _metrics(port)
            stopping = time.monotonic()
            server.send_signal(signal.SIGTERM)
            figures["exit_status"] = server.wait(120)
            figures["stop_s"] = round(time.monotonic() - stopping, 1)
        finally:
            if server.poll() is None:
                server.kill()
        figures["server_said"] = [line for line in log.read_text().splitlines() if line.startswith("stopped:")]
    settings = ServingConfig()
    result = {"clients": args.clients, "images_per_request": args.images, "seconds": args.seconds,
              "deadline_ms": settings.deadline_ms, "queue_images": settings.queue_images, **figures,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other work while measured"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
