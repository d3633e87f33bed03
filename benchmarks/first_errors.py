"""How fast the command line answers before any work (issue 24, item 2): `siamese --help`, a bad image
path, a missing model folder and a busy port, beside the cost of importing TensorFlow, which every one of
them paid before the arguments were checked first. Median wall time of fresh processes.

Figures, not assertions: the machine is shared. Writes benchmarks/results/first-errors.json.

    python benchmarks/first_errors.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "first-errors.json"
SIAMESE = [sys.executable, "-m", "pipelines.cli"]


def _median_seconds(command: list[str], repeats: int, expect_failure: bool) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        assert (done.returncode != 0) == expect_failure, done.stdout + done.stderr
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = {
            "help": (SIAMESE + ["--help"], False),
            "bad_image_path": (SIAMESE + ["predict", f"{tmp}/missing.png", "--model", tmp], True),
            "missing_model_folder": (SIAMESE + ["predict", f"{tmp}/missing.png", "--model", f"{tmp}/nope"], True),
            "busy_port": (SIAMESE + ["serve", "--port", port], True),
            "baseline_import_tensorflow": ([sys.executable, "-c", "import tensorflow"], False),
        }
        figures = {name: _median_seconds(command, args.repeats, failure) for name, (command, failure) in cases.items()}
    baseline = figures["baseline_import_tensorflow"]
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "load_average": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "median_seconds": figures,
        "ratio_to_tensorflow_import": {name: round(value / baseline, 3) for name, value in figures.items()},
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
