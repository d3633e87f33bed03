"""Scaling `siamese serve` out (issue 26): one replica alone, one behind nginx, and N replicas behind nginx (a standard
HTTP load balancer, round robin over keep-alive upstream connections), in the same run, on the demo's champion.

Each replica is a `siamese serve` process on its own loopback port, all reading one registry; with N replicas each
runs its forward pass on cores / N threads (serving.tf_threads), so they share the machine instead of fighting over
it. For 16 clients of single-image requests and 8 clients of 8-image requests (benchmarks/load.py, its own process):
requests/s, images/s, p50/p95/p99 latency, errors, CPU ms per request of the servers and nginx, their memory.
Figures, not assertions: the machine is shared. Needs the `nginx` binary (Debian: `apt-get install nginx-light`).
Writes benchmarks/results/scale-out.json.

    python benchmarks/scale_out.py [--seconds 8] [--replicas 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from load import in_own_process
from served_demo import free_port, register_demo_bundle, wait_for_ping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale-out.json"
LOADS = (("1 image", 16), ("8 images", 8))


def nginx_config(prefix: Path, port: int, upstreams: list[int]) -> Path:
    """An nginx configuration balancing ``port`` over ``upstreams`` round robin, with keep-alive on both sides."""
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstreams)
    path = prefix / "nginx.conf"
    path.write_text(f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  client_max_body_size 100m;
  upstream siamese {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://siamese;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Client-Key $http_x_client_key;
    }}
  }}
}}
""")
    return path


def _replica(tracking: str, work: Path, port: int, threads: int) -> subprocess.Popen:
    params = work / f"params-{threads}.yaml"
    params.write_text(f"serving:\n  tf_threads: {threads}\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", "models:/bench@champion",
                             "--no-log", "--port", str(port), "--params", str(params)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _measure(name: str, port: int, processes: list[subprocess.Popen], bodies: dict, seconds: float, work: Path) -> list:
    url = f"http://127.0.0.1:{port}/invocations"
    in_own_process(url, bodies["1 image"], 4, 2, work)  # warm up
    family = [p for process in processes for p in (psutil.Process(process.pid),
                                                    *psutil.Process(process.pid).children(recursive=True))]
    rows = []
    for size, clients in LOADS:
        cpu = sum(sum(p.cpu_times()[:2]) for p in family)
        row = {"setup": name, "request": size, "clients": clients, **in_own_process(url, bodies[size], clients, seconds, work)}
        used = sum(sum(p.cpu_times()[:2]) for p in family) - cpu
        row.pop("versions")
        row["images_per_s"] = round(row["requests_per_s"] * (8 if size == "8 images" else 1), 1)
        row["cpu_ms_per_request"] = round(1000 * used / max(row["requests"], 1), 2)
        row["rss_mb"] = round(sum(p.memory_info().rss for p in family) / 2**20)
        rows.append(row)
        print(row, flush=True)
    return rows


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            continue
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise SystemExit("nginx is not installed (Debian: apt-get install nginx-light)")
    sys.path.insert(0, str(ROOT))
    from pipelines.pyfunc_model import encode_image

    images = [encode_image(p) for p in sorted((ROOT / "data" / "demo" / "test").glob("*/*.png"))[:64]]
    bodies = {"1 image": [json.dumps({"inputs": [i]}).encode() for i in images],
              "8 images": [json.dumps({"inputs": images[n:n + 8]}).encode() for n in range(0, 56, 8)]}
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tracking = register_demo_bundle(work)
        for name, replicas, balanced in (("1 replica", 1, False), ("1 replica behind nginx", 1, True),
                                         (f"{args.replicas} replicas behind nginx", args.replicas, True)):
            ports = [free_port() for _ in range(replicas)]
            processes = [_replica(tracking, work, port, max(1, cores // replicas)) for port in ports]
            try:
                for port in ports:
                    wait_for_ping(port)
                port = ports[0]
                if balanced:
                    port = free_port()
                    prefix = work / f"nginx-{replicas}"
                    prefix.mkdir()
                    processes.append(subprocess.Popen([nginx, "-p", str(prefix), "-c", str(nginx_config(prefix, port, ports)),
                                                       "-g", "daemon off;"], start_new_session=True))
                    wait_for_ping(port)
                rows += _measure(name, port, processes, bodies, args.seconds, work)
            finally:
                _stop(processes)
    RESULTS.write_text(json.dumps({"machine": f"{platform.machine()}, {cores} CPUs", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
