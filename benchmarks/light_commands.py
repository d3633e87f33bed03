"""How long the commands that load no TensorFlow take, each in a fresh process (issue 33's goal: under 2 s on an
idle machine): promote, rollback, `rollout status`, the `registry` commands, `feedback import` and `review pull`,
against a registry of two versions of the tiny test model, on the embedded SQLite store and, with ``--server``,
through an `mlflow server` on that store. Prints the best and the median of ``--repeats`` runs; figures, not
assertions (the machine may be busy).

    python -m benchmarks.light_commands [--repeats 3] [--server]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipelines.process import quiet_libraries
from pipelines.supervisor import MLFLOW_SERVER_DEFAULTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model and registry helpers
from support.http import free_port  # noqa: E402
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle  # noqa: E402

MODEL = "tiny-recognizer"
SIAMESE = str(Path(sys.executable).parent / "siamese")


def commands(root: Path) -> list[list[list[str]]]:
    """Each command as the runs it cycles through (promote alternates between the two versions, so each run moves
    the alias)."""
    return [[["--help"]], [["rollout", "status", MODEL]], [["registry", "repair", MODEL]],
            [["registry", "sign", MODEL, "1"]],
            [["promote", MODEL, "1", "--reason", "timing"], ["promote", MODEL, "2", "--reason", "timing"]],
            [["rollback", MODEL, "--reason", "timing"]],
            [["feedback", "import", str(root / "labelled"), "--into", str(root / "train"), "--no-dvc", "--by", "timing"]],
            [["review", "pull", "--label-studio", "http://127.0.0.1:9"]]]


def timed(runs: list[list[str]], uri: str, root: Path, repeats: int) -> tuple[float, float, str]:
    """Best and median wall time of ``siamese <args>`` in a fresh process (cycling through ``runs``), and what the
    last run said."""
    seconds, done = [], None
    for repeat in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([SIAMESE, *runs[repeat % len(runs)]], cwd=root,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri, "LABEL_STUDIO_API_KEY": "timing"},
                              capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
    said = (done.stdout + done.stderr).strip().splitlines() if done else []
    return min(seconds), statistics.median(seconds), f"exit {done.returncode if done else '-'}: {said[-1][:70] if said else ''}"


def serve(store: str, root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on ``store`` (one worker), once it answers /health."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=root,
                              env={**MLFLOW_SERVER_DEFAULTS, **os.environ}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("mlflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", action="store_true", help="also through an mlflow server")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = store
        bundle = make_tiny_bundle(root)
        for top1 in (0.5, 0.7):
            register_bundle(pipeline_params(MODEL), bundle.path, {"top1": top1}, bundle.history, [], {},
                            score_champion=logged_scorer())
        (root / "labelled" / "digit 9").mkdir(parents=True)
        shutil.copy(next(bundle.path.parent.rglob("*.png")), root / "labelled" / "digit 9" / "reviewed.png")
        (root / "train").mkdir()
        targets = [("embedded store", store)]
        server = None
        if args.server:
            server, url = serve(store, root)
            targets.append(("mlflow server", url))
        try:
            for name, uri in targets:
                print(f"{name}: best / median of {args.repeats}, and what the last run said")
                for command in commands(root):
                    best, median, said = timed(command, uri, root, args.repeats)
                    print(f"  siamese {' '.join(command[0][:2]):<26} {best:5.2f} s / {median:5.2f} s  {said}")
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    main()
