"""A load generator for the serving benchmarks: N clients, each on its own keep-alive HTTP/1.1 connection (as a
``requests.Session`` or ``httpx.Client`` keeps one), sending POST bodies in turn for a fixed time.

It runs in its own process (one asyncio loop), so its CPU is not the server's and the benchmark's TensorFlow does not
slow it. Prints one JSON object: requests/s, p50/p95/p99 latency in ms, errors, requests, and the answering
``X-Model-Version`` counts.

    python benchmarks/load.py http://127.0.0.1:5001/invocations BODIES.jsonl --clients 16 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


async def _client(host: str, port: int, path: str, bodies: list[bytes], offset: int, stop: float,
                  latencies: list[float], tally: collections.Counter) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = offset
    try:
        while time.perf_counter() < stop:
            body = bodies[n % len(bodies)]
            n += 1
            started = time.perf_counter()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
            headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
            if headers.get("transfer-encoding") == "chunked":
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(int(headers.get("content-length", 0)))
            if head[0].split(" ")[1] == "200":
                latencies.append(1000 * (time.perf_counter() - started))
                tally[headers.get("x-model-version", "")] += 1
            else:
                tally["errors"] += 1
            if headers.get("connection") == "close":
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    except (OSError, asyncio.IncompleteReadError):
        tally["errors"] += 1
    finally:
        writer.close()


async def run(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """Load ``url`` with ``clients`` connections for ``seconds``; the figures as a dict."""
    parts = urlsplit(url)
    latencies: list[float] = []
    tally: collections.Counter = collections.Counter()
    began = time.perf_counter()
    await asyncio.gather(*(_client(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/", bodies, i * 7,
                                   began + seconds, latencies, tally) for i in range(clients)))
    elapsed = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    errors = tally.pop("errors", 0)
    return {"requests_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(cuts[49], 1),
            "p95_ms": round(cuts[94], 1), "p99_ms": round(cuts[98], 1), "errors": errors, "requests": len(latencies),
            "versions": dict(tally)}


def in_own_process(url: str, bodies: list[bytes], clients: int, seconds: float, work: Path) -> dict:
    """:func:`run` in a process of its own (bodies written to a file under ``work``): the figures as a dict."""
    path = work / "bodies.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    done = subprocess.run([sys.executable, __file__, url, str(path), "--clients", str(clients), "--seconds",
                           str(seconds)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("bodies", help="a file of request bodies, one JSON document per line")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with open(args.bodies, "rb") as handle:
        bodies = [line.rstrip(b"\n") for line in handle if line.strip()]
    print(json.dumps(asyncio.run(run(args.url, bodies, args.clients, args.seconds))))


if __name__ == "__main__":
    main()
