"""How far a reader walks: the project functions one pipeline step or one served request calls, in the order they
first run.

It runs the tiny demo pipeline in a temporary project up to evaluate, then traces the register stage (as
``siamese stage register`` runs it), then one ``POST /invocations`` to the app ``siamese serve`` builds for the
champion it registered, and prints each walk: each project function (``pipelines/``, ``siamese_core/``) the first
time it is called, down to ``--depth`` calls below the stage's ``run`` or the app's ``invocations`` (work the request
hands to another thread counts from that thread's first project function). A *stop* is one such function; a *return*
is a stop in a file the walk had already left. ``python benchmarks/walk.py [--depth 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from pipelines.demo_data import write_demo_data
from pipelines.params import load_params
from pipelines.pyfunc_model import encode_image
from pipelines.runner import run_alone
from pipelines.serving.app import build_app
from pipelines.serving.following import Served

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (str(ROOT / "pipelines"), str(ROOT / "siamese_core"))
TINY = {"preset": None, "model": {"backbone": "small_cnn", "weights": None, "input_size": 32, "head_units": [16],
                                  "embedding_dim": 8}, "train": {"epochs": 1},
        "evaluate": {"baseline_margin": -1.0}}  # one tiny epoch need not beat the baselines to be champion


def _project(folder: Path) -> None:
    """A project with the tiny demo data and params, its stages up to evaluate done."""
    shutil.copy(ROOT / "params.yaml", folder)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_demo_data(folder / "data" / "demo", classes=6, per_class=8)
    for stage in ("validate", "triplets", "train", "embed", "evaluate"):
        subprocess.run([sys.executable, "-m", "pipelines.cli", "stage", stage], cwd=folder, check=True,
                       capture_output=True)


@contextmanager
def traced(depth: int, entry: str) -> Iterator[list[tuple[str, str]]]:
    """Fills the list it yields with (file, function) of each project function run inside the function ``entry``
    (a file's relative path and a name), first calls only, ``depth`` levels below it; in other threads, counted
    from their first project function."""
    seen: dict[tuple[str, str], None] = {}
    levels: dict[int, int] = {threading.get_ident(): -1}  # -1 until entry runs; then 0 for entry itself

    def profile(frame, event, _arg):
        code = frame.f_code
        if event not in ("call", "return") or not code.co_filename.startswith(PACKAGES):
            return
        where = (os.path.relpath(code.co_filename, ROOT), code.co_qualname)
        thread = threading.get_ident()
        level = levels.setdefault(thread, 0)
        if level < 0:
            if event == "call" and f"{where[0]}:{where[1]}" == entry:
                levels[thread] = 0
            return
        if event == "return":
            levels[thread] = level - 1
            return
        levels[thread] = level + 1
        if level + 1 <= depth and not code.co_name.startswith("<"):  # comprehensions and lambdas are read in place
            seen.setdefault(where, None)

    walk: list[tuple[str, str]] = []
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield walk
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        walk.extend(seen)


def _served_walk(app, image: Path, depth: int, entry: str) -> list[tuple[str, str]]:
    """The walk of one request, after a first one that warms the model (one event loop for both, as a server has)."""
    body = {"dataframe_records": [{"image": encode_image(image)}]}

    async def send() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://walk") as client:
            (await client.post("/invocations", json=body)).raise_for_status()
            with traced(depth, entry) as walk:
                (await client.post("/invocations", json=body)).raise_for_status()
        return walk

    return asyncio.run(send())


def walk_figures(walk: list[tuple[str, str]], start: str) -> dict[str, int]:
    """Stops, files and returns of a walk that starts in the file ``start``."""
    left: set[str] = set()
    returns, current = 0, start
    for file, _ in walk:
        if file != current:
            returns += file in left
            left.add(current)
            current = file
    return {"stops": len(walk), "files": len({file for file, _ in walk}), "returns": returns}


def _print(name: str, walk: list[tuple[str, str]], start: str) -> None:
    print(f"\n{name}")
    for file, function in walk:
        print(f"  {file}  {function}")
    print(f"  {walk_figures(walk, start)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=1, help="call levels below the entry to follow")
    depth = parser.parse_args().depth
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        _project(folder)
        os.chdir(folder)
        stage = "pipelines/stages/register.py"
        with traced(depth, f"{stage}:run") as walk:
            run_alone("register", load_params("params.yaml"))
        _print("the register stage", walk, stage)
        app = build_app(Served("models:/siamese-recognizer@champion", reload_seconds=0))
        image = min((folder / "data" / "demo" / "test").glob("*/*.png"))
        served = "pipelines/serving/app.py"
        _print("a served request", _served_walk(app, image, depth, f"{served}:build_app.<locals>.invocations"), served)


if __name__ == "__main__":
    main()
