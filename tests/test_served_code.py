"""Which code answers for a version: a version records the code it was registered with; `siamese serve` runs its own
code and says so in one line when that differs (or refuses, serving.code_mismatch: refuse); a fresh process that
loads the stored model, as `mlflow models serve` does, runs the stored copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import integrity, registry
from pipelines.pyfunc_model import encode_image

from support.http import HOST, free_port, post_json, stop_group, wait_until_ready
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

SIAMESE = os.path.join(os.path.dirname(sys.executable), "siamese")
NAME = "coded"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def _changed_code(stored: Path, root: Path) -> Path:
    """A copy of a version's stored packages with one served file changed."""
    for package in ("pipelines", "siamese_core"):
        shutil.copytree(stored / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    changed = root / "pipelines" / "pyfunc_model.py"
    changed.write_text(changed.read_text() + "\n# a change made after the version was registered\n")
    return root


def _serve(tmp_path: Path, env: dict, mismatch: str) -> tuple[subprocess.Popen, str, Path]:
    params, port = _params(tmp_path, mismatch), free_port()
    log = tmp_path / f"serve-{mismatch}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [SIAMESE, "serve", "--model", f"models:/{NAME}@champion", "--params", str(params), "--no-log", "--host",
             HOST, "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return process, f"http://{HOST}:{port}", log


def test_siamese_serve_warns_or_refuses_when_it_runs_other_code_than_the_version_stores(bundle, tmp_path, monkeypatch):
    uri = use_sqlite_store(monkeypatch, tmp_path)
    register_bundle(pipeline_params(NAME), bundle.path, {"top1": 0.5}, bundle.history, [], {},
                    score_champion=logged_scorer())
    tags = MlflowClient().get_model_version(NAME, "1").tags
    stored = registry.verified_download(f"models:/{NAME}/1")
    try:
        registered = shutil.copytree(stored / "code", tmp_path / "registered")  # the code the version stores
    finally:
        shutil.rmtree(stored, ignore_errors=True)
    assert tags[integrity.CODE_VERSION_TAG]
    assert tags[integrity.CODE_DIGEST_TAG] == integrity.code_digest((registered / "siamese_core", registered / "pipelines"))
    code = _changed_code(registered, tmp_path / "code")
    assert integrity.code_digest((code / "siamese_core", code / "pipelines")) != tags[integrity.CODE_DIGEST_TAG]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"}

    refused = subprocess.run(
        [SIAMESE, "serve", "--model", f"models:/{NAME}@champion", "--params", str(_params(tmp_path, "refuse")),
         "--no-log", "--port", str(free_port())], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = [line for line in refused.stderr.splitlines() + refused.stdout.splitlines() if "other code" in line]
    assert refused.returncode == 1 and len(said) == 1, refused.stderr[-3000:]
    assert "not served (serving.code_mismatch: refuse)" in said[0] and "Traceback" not in refused.stderr

    process, base, log = _serve(tmp_path, env, "warn")
    try:
        wait_until_ready(base, process, log)
        status, answer = post_json(f"{base}/invocations", {"inputs": [encode_image(bundle.gallery_images["digit 1"][0])]})
        assert status == 200 and answer["predictions"][0]["label"].startswith("digit")
    finally:
        stop_group(process)
    warned = [line for line in log.read_text().splitlines() if "other code" in line]
    assert len(warned) == 1 and "this code answers for it (serving.code_mismatch: warn)" in warned[0]

    same = subprocess.run(  # the code it was registered with: nothing to say, even with refuse
        [sys.executable, "-c", f"from pipelines import registry; registry.load_version('models:/{NAME}/1', 'refuse')"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(registered)}, capture_output=True, text=True, timeout=300)
    assert same.returncode == 0 and "other code" not in same.stderr, same.stderr[-3000:]


def test_a_fresh_process_loading_the_stored_model_runs_the_stored_code(bundle, tmp_path, monkeypatch):
    """What `mlflow models serve` does: MLflow puts the stored code first on sys.path of a process that has not
    imported the project, so the version's own copy answers."""
    use_sqlite_store(monkeypatch, tmp_path)
    register_bundle(pipeline_params(NAME), bundle.path, {"top1": 0.5}, bundle.history, [], {},
                    score_champion=logged_scorer())
    stored = registry.verified_download(f"models:/{NAME}/1")
    try:
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, mlflow; mlflow.pyfunc.load_model(sys.argv[1]); "
             "print(sys.modules['pipelines.pyfunc_model'].__file__)", str(stored)],
            cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert Path(loaded.stdout.strip()).is_relative_to(stored)
    finally:
        shutil.rmtree(stored, ignore_errors=True)


def _params(tmp_path: Path, mismatch: str) -> Path:
    path = tmp_path / f"{mismatch}.yaml"
    path.write_text(yaml.safe_dump({"serving": {"code_mismatch": mismatch}}))
    return path

