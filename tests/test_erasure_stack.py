"""Erasure on the shared stack (`siamese stack up`: PostgreSQL-backed MLflow with its artifacts in the project's S3
store, the inference log, the review queue and the DVC remote in the same bucket): a served champion that knows a
class answers traffic that includes it; `siamese erase --class` then leaves nothing in any place that yields the
class's images (by the sha256 of each) or its name, outside the audit record, and the champion, followed by the
server without a restart, answers the other classes as before. Then `--image-digest` does the same for one image.
Skipped, with the reason, where PostgreSQL's programs or the stack's packages are absent. Slow: a stack start-up."""

from __future__ import annotations

import getpass
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from pipelines import stack, stack_services, stack_state
from pipelines.cli import app
from pipelines.pyfunc_model import encode_image
from siamese_core.config import apply_overrides

from support.erasure_search import Search, log_old_dataset_input
from support.http import HOST, free_port, stop_group, wait_until_ready
from support.models import make_tiny_bundle, pipeline_params, register_bundle

MISSING = stack_services.missing()
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"shared stack not available: {MISSING}"),
              pytest.mark.slow]  # a stack start-up, a tiny training, a server and two erasures: minutes
NAME, ERASED = "tiny-erasure", "digit 2"
SIAMESE = os.path.join(os.path.dirname(sys.executable), "siamese")
PREFIXES = {"dvc remote (S3)": "dvc/", "inference log (S3)": "inference/", "review queue (S3)": "review/"}
FOLDERS = {"training data": "data", "pipeline outputs": "artifacts", "dvc cache": ".dvc/cache",
           "stage cache": ".siamese-cache", "run workspaces": "runs"}


@pytest.fixture(scope="module")
def shared_stack():
    """`siamese stack up` into a folder PostgreSQL's user can reach, on free ports; `down` at the end."""
    base = Path(tempfile.mkdtemp(prefix="siamese-stack-"))
    base.chmod(0o755)
    try:
        yield stack.up(base / "stack", base_port=None, worker=getpass.getuser())  # as root: named, not picked
    finally:
        stack.down(base / "stack")
        shutil.rmtree(base, ignore_errors=True)


class Served:
    """`siamese serve` of the champion, following its alias every second, logging to the stack's bucket (or, with
    ``log`` False, a replica that logs nothing: the test's own questions leave no record)."""

    def __init__(self, folder: Path, log: bool = True):
        self.port = free_port()
        self.log_path = folder / f"serve-{self.port}.log"
        command = [SIAMESE, "serve", "--model", f"models:/{NAME}@champion", "--params", "params.yaml", "--reload-seconds",
                   "1", "--host", HOST, "--port", str(self.port), *(() if log else ("--no-log",))]
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(command, cwd=folder, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Served:
        try:
            wait_until_ready(f"http://{HOST}:{self.port}", self.process, self.log_path)
        except BaseException:
            stop_group(self.process)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.process)

    def ask(self, images: list[str]) -> tuple[str, list[dict]]:
        """The answering version and its answers to base64 images."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            connection.request("POST", "/invocations", json.dumps({"inputs": images}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            body = json.loads(response.read())
        finally:
            connection.close()
        assert response.status == 200, body
        return response.headers["X-Model-Version"], body["predictions"]

    def logged(self, count: int) -> None:
        """Wait until ``count`` records are written and the review queue's writes (after them) have stopped."""
        deadline, seen = time.monotonic() + 60, None
        while True:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/stats", timeout=10) as response:
                counts = json.loads(response.read())["inference_log"]
            done = counts["written"] >= count and (counts["review"], counts["review_lost"]) == seen
            if done:
                return
            seen = (counts["review"], counts["review_lost"]) if counts["written"] >= count else None
            assert time.monotonic() < deadline, counts
            time.sleep(1)

    def following(self, version: str, image: str) -> None:
        """Wait until ``version`` answers (the server swaps it in without a restart)."""
        deadline = time.monotonic() + 120
        while self.ask([image])[0] != version:
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(1)


def _s3():
    return boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"], region_name=stack_state.REGION)


def _found(root: Path, search: Search, database: str, answers: list[dict], audit: str | None = None) -> dict[str, int]:
    """Per place: files, objects, rows or answers that yield what ``search`` looks for."""
    s3 = _s3()
    hits = {place: search.files(root / folder) for place, folder in FOLDERS.items()}
    hits["dvc state"] = search.dvc_state(root)
    hits |= {place: search.objects(s3, stack_state.BUCKET, prefix) for place, prefix in PREFIXES.items()}
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack_state.BUCKET, Prefix="mlartifacts/") for item in page.get("Contents", [])
        if not (audit and audit in item["Key"])]
    held = [search.yields(s3.get_object(Bucket=stack_state.BUCKET, Key=key)["Body"].read(), key) for key in keys]
    hits["registered model artifacts (S3)"] = sum(h for key, h in zip(keys, held) if "/models/" in key)
    hits["run artifacts (S3)"] = sum(h for key, h in zip(keys, held) if "/models/" not in key)
    hits["tracking database rows (PostgreSQL)"] = sum(search.rows(database).values())
    hits["server answers"] = sum(search.yields(json.dumps(answer).encode()) for answer in answers)
    return hits


def _table(title: str, before: dict[str, int], after: dict[str, int]) -> str:
    return f"\n{title}\n| place | before -> after |\n|---|---|\n" + "\n".join(
        f"| {place} | {before[place]} -> {after[place]} |" for place in before)


def _erase(*args: str) -> dict:
    done = CliRunner().invoke(app, ["erase", *args, "--reason", "request 19", "--json", "--params", "params.yaml"])
    assert done.exit_code == 0, done.output
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))  # MLflow prints too


def test_erase_a_class_and_an_image_on_the_shared_stack(shared_stack, tmp_path, monkeypatch):
    env = stack_state.client_env(shared_stack)
    keys, postgres = stack_state.secrets(shared_stack["root"]), shared_stack["services"]["postgres"]
    database = f"postgresql+psycopg2://mlflow:{keys['postgres_password']}@{HOST}:{postgres['port']}/mlflow"
    for key, value in {**env, "MLFLOW_BACKEND_STORE_URI": database}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    tiny = make_tiny_bundle(tmp_path)  # data/train, data/test and bundle/ under tmp_path
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"],
                    *([*dvc, *line.split()[1:]] for line in stack_state.dvc_remote_commands(shared_stack)),
                    [*dvc, "add", "-q", "data"], [*dvc, "push", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    params = apply_overrides(pipeline_params(NAME), {
        "data.train_dir": "data/train", "data.test_dir": "data/test",
        "monitoring.log_uri": f"s3://{stack_state.BUCKET}/inference",
        "monitoring.review_dir": f"s3://{stack_state.BUCKET}/review", "monitoring.log_images": True,
        "monitoring.log_embeddings": True, "monitoring.review_margin": 1e9, "monitoring.flush_seconds": 0.1})
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    report = tmp_path / "confusion.csv"
    report.write_text("class,digit 0,digit 1,digit 2\n" + "\n".join(f"{c},1,0,0" for c in tiny.gallery_images))
    registered = register_bundle(params, tiny.path, {"top1": 0.5, "per_class_accuracy": {
        c: 0.5 for c in tiny.gallery_images}}, tiny.history, [report], {"git_commit": "x"},
        score_champion=lambda champion: None)
    log_old_dataset_input(registered["run_id"], {"digit 0": 9, "digit 1": 9, ERASED: 9})
    shutil.copytree(tiny.path, tmp_path / "artifacts" / "bundle")  # as `dvc repro` leaves the pipeline's outputs
    (tmp_path / ".siamese-cache" / "stages" / "embed" / "k1").mkdir(parents=True)
    shutil.copy(tiny.path / "gallery.npz", tmp_path / ".siamese-cache" / "stages" / "embed" / "k1")
    shutil.copytree(tmp_path / "data", tmp_path / "runs" / "20260101-000000-train" / "data")

    images = {label: [encode_image(p) for p in paths] for label, paths in tiny.gallery_images.items()}
    others = [image for label, encoded in images.items() if label != ERASED for image in encoded]
    with Served(tmp_path) as server, Served(tmp_path, log=False) as probe:
        traffic = [image for encoded in images.values() for image in encoded[:3]]  # every class
        assert server.ask(traffic)[0] == "1"
        server.logged(len(traffic))
        version, served = probe.ask(others)
        assert version == "1"
        digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "data").rglob(f"{ERASED}/*.png")}
        search = Search(ERASED, digests)
        before = _found(tmp_path, search, database, probe.ask(images[ERASED])[1])
        assert all(before.values()), before

        dry = _erase("--class", ERASED, "--dry-run")
        assert all(item.startswith(f"s3://{stack_state.BUCKET}/dvc/") for item in dry["places"]["dvc remote"])
        assert dry["places"]["dvc remote"] and dry["places"]["tracking database"]
        assert _found(tmp_path, search, database, probe.ask(images[ERASED])[1]) == before  # changes nothing

        done = _erase("--class", ERASED)
        probe.following(done["new_version"], others[0])
        after = _found(tmp_path, search, database, probe.ask(images[ERASED])[1], done["audit_run"])
        print(_table("places checked on the shared stack, erasing class 'digit 2' (found before -> after):",
                     before, after))
        assert not any(after.values()), after
        now = probe.ask(others)[1]
        assert [a["label"] for a in now] == [a["label"] for a in served]
        assert [a["distance"] for a in now] == pytest.approx([a["distance"] for a in served], abs=1e-6)

        one = images["digit 1"][0]  # a gallery image: its own nearest, at distance 0
        digest = hashlib.sha256(Path(tiny.gallery_images["digit 1"][0]).read_bytes()).hexdigest()
        search = Search(None, {digest})
        server.following(done["new_version"], others[0])
        server.ask([one])  # traffic again: its review item went with the class, whose name its top-k held
        deadline = time.monotonic() + 60
        while not all(search.objects(_s3(), stack_state.BUCKET, prefix) for prefix in ("inference/", "review/")):
            assert time.monotonic() < deadline, "the server logged nothing to the bucket"
            time.sleep(1)
        [answer] = probe.ask([one])[1]
        before = _found(tmp_path, search, database, [answer])
        assert answer["distance"] < 1e-6 and all(before[place] for place in (
            "training data", "dvc cache", "dvc remote (S3)", "inference log (S3)", "review queue (S3)",
            "registered model artifacts (S3)")), before
        done = _erase("--image-digest", digest)
        probe.following(done["new_version"], others[0])
        [answer] = probe.ask([one])[1]
        after = _found(tmp_path, search, database, [answer], done["audit_run"])
        print(_table(f"the same, erasing one image by --image-digest {digest[:12]}…:", before, after))
        assert not any(after.values()), after
        assert answer["distance"] > 1e-6, "the image is no longer in the served gallery"
