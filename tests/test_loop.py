"""The whole loop after shipping, on real servers, as the docs' walk-through ("Monitor and retrain") runs it:
serve the champion with logging on; send known classes, then classes it never saw; the monitoring flow on a
Prefect server sees the unknown rate and the distances jump and its drift event starts the retraining
deployment; a person labels the review queue; the import makes a new data version; the next drift-started
retraining trains on it, and the new version recognises the newly labelled classes.

Run once against the embedded default (SQLite MLflow, a local log, `prefect server start` and `siamese flows
serve`) and once against the shared stack (PostgreSQL-backed MLflow and Prefect servers, the log on S3, the
deployments of prefect.yaml run by the stack's worker). About 4-6 minutes each: marked slow.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.pyfunc_model import encode_image

from support.http import HOST, free_port, stop_group, wait_until_ready
from support.project import REPO, dvc_project

MODEL = "siamese-recognizer"
SIAMESE = os.path.join(os.path.dirname(sys.executable), "siamese")
MONITOR = """
import json, sys
from pipelines.flows import monitoring_flow
print("RESULT", json.dumps(monitoring_flow()))
"""


def _prefect_server(tmp_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    with open(tmp_path / "prefect.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url, server
        except OSError:
            time.sleep(1)
    stop_group(server)
    pytest.fail(f"prefect server did not start:\n{(tmp_path / 'prefect.log').read_text()[-3000:]}")


def _project(tmp_path: Path, write_params, env: dict, log_uri: str):
    """A git + DVC clone with 6 known classes (7 training and 3 test drawings each), no held-out folder, logging on."""
    from pipelines.demo_data import write_demo_data

    settings = {"train.epochs": 6, "monitoring.log_uri": log_uri, "monitoring.log_images": True,
                "monitoring.flush_seconds": 0.5, "monitoring.min_records": 20, "monitoring.window_hours": 1}
    repo, run, dvc = dvc_project(tmp_path, lambda path: write_params(path, settings), env)
    write_params(repo / "params.yaml", {**settings, "data.heldout_dir": None})  # then dvc-yaml drops the folder
    shutil.rmtree(repo / "data" / "demo")
    write_demo_data(repo / "data" / "demo", classes=6, per_class=10)
    shutil.rmtree(repo / "data" / "demo" / "heldout")
    run(sys.executable, "-m", "pipelines.cli", "dvc-yaml")
    run(*dvc, "add", "-q", "data/demo")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "the project, 6 known classes")
    traffic = tmp_path / "traffic"
    write_demo_data(traffic, classes=6)  # 20 drawings of the same 6 known classes, and 6 classes it never saw
    known = [p for p in sorted((traffic / "train").glob("*/*.png")) + sorted((traffic / "test").glob("*/*.png"))
             if int(p.stem) >= 10]  # drawings the project does not hold
    return repo, run, dvc, known, sorted((traffic / "heldout").glob("*/*.png"))


def _send(base: str, images: list[Path]) -> None:
    for start in range(0, len(images), 8):
        body = json.dumps({"dataframe_records": [{"image": encode_image(p)} for p in images[start:start + 8]]}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200


def _out_of_domain(folder: Path, count: int) -> list[Path]:
    """``count`` images of coloured noise: traffic plainly unlike any handwritten character."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = [folder / f"{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return paths


def _monitor(repo: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", MONITOR], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT " in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def _drift_run(env: dict, window: str, timeout: float) -> dict:
    """Wait for the retraining flow run the automation started for this monitoring window to end; its state."""
    code = f"""
import json, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
deadline = time.monotonic() + {timeout}
with get_client(sync_client=True) as client:
    while time.monotonic() < deadline:
        runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["siamese-retraining"])))
                if r.parameters.get("monitoring_window") == "{window}"]
        if runs and runs[0].state.is_final():
            print("RUN", json.dumps({{"state": runs[0].state.type.value, "parameters": runs[0].parameters}}))
            break
        time.sleep(2)
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert "RUN " in done.stdout, f"no retraining run for monitoring window {window}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.split("RUN ", 1)[1])


def _walk_through(repo: Path, run, dvc, known: list[Path], heldout: list[Path], env: dict, runs_flows) -> dict:
    """The loop; ``runs_flows`` starts whatever runs the deployments (and stops it when the loop ends)."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    times: dict[str, float] = {}
    clock = time.monotonic()
    run(*dvc, "repro")
    times["dvc repro (champion)"] = time.monotonic() - clock
    port = free_port()
    with open(repo / "serve.log", "wb") as log:
        server = subprocess.Popen([SIAMESE, "serve", "--port", str(port)], cwd=repo, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    flows = runs_flows()
    try:
        base = f"http://{HOST}:{port}"
        wait_until_ready(base, server, repo / "serve.log")
        clock = time.monotonic()
        _send(base, known)
        time.sleep(2)  # the log writes within monitoring.flush_seconds
        calm = _monitor(repo, env)
        _send(base, heldout)
        _send(base, _out_of_domain(repo.parent / "noise", 60))  # a shift no CPU's numerics can hide
        time.sleep(2)
        drift = _monitor(repo, env)
        times["traffic and two monitoring runs"] = time.monotonic() - clock
        assert calm["figures"]["records"] == len(known) and drift["figures"]["records"] == len(known) + len(heldout) + 60
        # the answers over the threshold jump, answered unknown where the champion rejects (reject_unknown: auto
        # turns it on only when the calibration met its target), with a class where it does not
        assert drift["figures"]["over_threshold_rate"] > calm["figures"]["over_threshold_rate"] + 0.15, (calm, drift)
        assert drift["figures"]["distance_ks"] > calm["figures"]["distance_ks"], (calm, drift)
        assert drift["fired"], drift
        clock = time.monotonic()
        skipped = _drift_run(env, drift["window"], 300)
        times["automation to finished retraining (no new data)"] = time.monotonic() - clock
        assert skipped["state"] == "COMPLETED" and skipped["parameters"]["trigger"] == "drift", skipped
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1, "no new data: nothing trained"

        truth = {hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.name for p in heldout}
        pending = sorted((repo / "review" / "pending").rglob("*.png"))
        assert len(pending) >= 10, "unknowns went to the review queue"
        for image in pending:  # the person's work: the right class for each
            sidecar = json.loads(image.with_suffix(".json").read_text())
            label = truth.get(sidecar["sha256"])
            if label is None:
                continue  # a known class answered with a small margin: not these classes
            target = repo / "review" / "labelled" / label
            target.mkdir(parents=True, exist_ok=True)
            for moved in (image, image.with_suffix(".json")):
                moved.rename(target / moved.name)
        before = (repo / "data" / "demo.dvc").read_text()
        run(SIAMESE, "feedback", "import", "--by", "reviewer")
        assert (repo / "data" / "demo.dvc").read_text() != before, "the import is a new data version"
        run("git", "add", "-A")
        run("git", "commit", "-qm", "labelled review images")
        clock = time.monotonic()
        again = _monitor(repo, env)
        assert again["fired"], again
        retrained = _drift_run(env, again["window"], 540)
        times["automation to finished retraining (new data)"] = time.monotonic() - clock
        assert retrained["state"] == "COMPLETED", retrained
    finally:
        stop_group(server)
        flows.close()
    newest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    tags = client.get_run(newest.run_id).data.tags
    assert (tags["retraining.trigger"], tags["retraining.monitoring_run_id"], tags["retraining.monitoring_window"]) == (
        "drift", again["run_id"], again["window"])
    inputs = [d.dataset.name for d in client.get_run(newest.run_id).inputs.dataset_inputs]
    assert any(name.startswith("feedback-") for name in inputs), inputs
    labelled = sorted((repo / "review" / "imported").rglob("*.png"))
    predicted = subprocess.run([SIAMESE, "predict", "--json", "--model", f"models:/{MODEL}/{newest.version}",
                                *map(str, labelled[:12])], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answers = json.loads(predicted.stdout)
    expected = [truth[hashlib.sha256(p.read_bytes()).hexdigest()] for p in labelled[:12]]
    assert [a["label"] for a in answers] == expected  # now in its gallery: its own class
    assert max(a["distance"] for a in answers) < 1e-3
    return {"times": times, "calm": calm["figures"], "drift": drift["figures"], "fired": drift["fired"]}


class _Running:
    def __init__(self, *processes: subprocess.Popen):
        self.processes = processes

    def close(self) -> None:
        for process in self.processes:
            stop_group(process)


@pytest.mark.slow
def test_the_loop_on_the_embedded_default(tmp_path, write_params):
    """SQLite MLflow, the log in a local folder, `prefect server start` and `siamese flows serve` as the runner."""
    from support.project import dvc_env

    api, prefect = _prefect_server(tmp_path)
    env = {**dvc_env(tmp_path), "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        repo, run, dvc, known, heldout = _project(tmp_path, write_params, env, "logs/inference")

        def runner() -> _Running:
            with open(repo / "flows-serve.log", "wb") as log:
                process = subprocess.Popen([SIAMESE, "flows", "serve"], cwd=repo, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            time.sleep(15)  # the deployments and the automation are created
            assert process.poll() is None, (repo / "flows-serve.log").read_text()[-3000:]
            return _Running(process)

        figures = _walk_through(repo, run, dvc, known, heldout, env, runner)
    finally:
        stop_group(prefect)
    print("\nembedded default:", json.dumps(figures, indent=1))


@pytest.mark.slow
def test_the_loop_on_the_shared_stack(tmp_path, write_params):
    """The stack: MLflow and Prefect servers on PostgreSQL, the log on its S3 server, prefect.yaml's deployments
    and trigger run by its worker."""
    if shutil.which("initdb") is None:
        pytest.skip("PostgreSQL's initdb is not installed: the stack cannot start")
    from pipelines import stack, stack_state

    base = Path(tempfile.mkdtemp(prefix="siamese-stack-"))  # PostgreSQL's user must reach it: not pytest's tmp
    base.chmod(0o755)
    up = stack.up(base / "stack", base_port=None, worker=getpass.getuser())
    env = {**stack_state.client_env(up), "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        from support.project import dvc_env

        env = {**dvc_env(tmp_path), **env}
        repo, run, dvc, known, heldout = _project(tmp_path, write_params, env, f"s3://{stack_state.BUCKET}/inference")

        def deploy() -> _Running:
            deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())
            (repo / "prefect.yaml").write_text(yaml.safe_dump(deployment, sort_keys=False))
            done = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=repo,
                                  env={**env, "PWD": str(repo)}, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            return _Running()

        figures = _walk_through(repo, run, dvc, known, heldout, {**env, "PWD": str(repo)}, deploy)
    finally:
        stack.down(base / "stack")
        shutil.rmtree(base, ignore_errors=True)
    print("\nshared stack:", json.dumps(figures, indent=1))
