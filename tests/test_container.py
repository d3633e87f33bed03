"""The container form: the base image made offline from Debian's packages, the image (non-root, trimmed, a
health check, no secrets), the demo pipeline inside it, and the team stack of container/compose.yaml brought up,
used from the host through its published ports, taken down and up with its data kept. Slow: they build images.

They use podman (with podman-compose) or docker (with `docker compose`), whichever works here, and skip with the
reason where neither does. Building the base image needs root and debootstrap.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.http import free_port, post_json
from support.project import REPO
from support.tiny import TINY_PARAMS

pytestmark = pytest.mark.slow

BASE = "localhost/siamese-base:bookworm"
TAG = "test"
IMAGE = f"localhost/siamese-recognizer:{TAG}"
MODEL = "siamese-recognizer"
PROJECT = "siamese-container-test"


def _engine_env(tmp: Path) -> dict[str, str]:
    """podman's environment. A sandboxed machine may refuse podman's default rlimits (a larger nofile or nproc
    than it allows) and crun on hybrid cgroups: then a containers.conf within this process's limits, and runc."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" in env:
        return env
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    conf = f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
    if shutil.which("runc") and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        conf += '[engine]\nruntime = "runc"\n'
    (tmp / "containers.conf").write_text(conf)
    return {**env, "CONTAINERS_CONF": str(tmp / "containers.conf")}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(engine, compose command, environment): podman with podman-compose, else docker with `docker compose`;
    skips with the reason when neither runs a container."""
    tmp = tmp_path_factory.mktemp("engine")
    tried = []
    for name, compose in (("podman", ["podman-compose"]), ("docker", ["docker", "compose"])):
        if not shutil.which(name):
            tried.append(f"{name}: not installed")
            continue
        env = _engine_env(tmp) if name == "podman" else dict(os.environ)
        done = subprocess.run([name, "info"], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            tried.append(f"{name}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        return name, compose, env
    pytest.skip("no container engine works here: " + "; ".join(tried))


def _run(command: list[str], env: dict, timeout: float = 1800, check: bool = True, **kwargs) -> str:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)
    output = done.stdout + done.stderr
    assert not check or done.returncode == 0, f"{' '.join(command)} failed:\n{output[-5000:]}"
    print(f"\n{' '.join(command)[:100]}: {time.monotonic() - started:.0f} s")
    return output


@pytest.fixture(scope="module")
def images(engine):
    """The base image from Debian's packages, then the three images on it (container/build-images.sh)."""
    name, _, env = engine
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("building the base image needs root and debootstrap (apt-get install debootstrap)")
    _run([str(REPO / "container/base-image.sh"), BASE], {**env, "ENGINE": name})
    cert = os.environ.get("PIP_CERT", "")  # a TLS-intercepting proxy's CA bundle, handed to pip as a build secret
    _run([str(REPO / "container/build-images.sh")], {**env, "ENGINE": name, "BASE_IMAGE": BASE, "TAG": TAG,
                                                     "PIP_CERT": cert if Path(cert).is_file() else ""})
    sizes = _run([name, "image", "ls", "--filter", "reference=localhost/siamese-*"], env)
    print(sizes)
    return name, env


def _in_image(images, *command: str, options: tuple[str, ...] = ()) -> str:
    name, env = images
    return _run([name, "run", "--rm", *options, IMAGE, *command], env, timeout=900)


def test_base_image_is_debian_bookworm_with_python_3_11_and_no_apt_lists_or_docs(images):
    name, env = images
    shown = _run([name, "run", "--rm", BASE, "sh", "-c",
                  "python3 --version; grep VERSION_CODENAME /etc/os-release; python3 -c 'import venv, ssl';"
                  "find /var/lib/apt/lists /var/cache/apt /usr/share/man /usr/share/doc -type f -not -name copyright"
                  " | wc -l"], env)
    assert "Python 3.11." in shown and "VERSION_CODENAME=bookworm" in shown
    assert shown.strip().splitlines()[-1] == "0"  # no apt lists or caches, man pages or docs (but copyrights)
    size = json.loads(_run([name, "image", "inspect", BASE], env))[0]["Size"]
    assert size < 200e6, f"the base image is {size / 1e6:.0f} MB"


def test_image_runs_as_a_user_serves_with_a_health_check_and_holds_no_tests_caches_or_secrets(images):
    name, env = images
    inspected = json.loads(_run([name, "image", "inspect", IMAGE], env))[0]
    config = inspected["Config"]
    assert config["User"] == "siamese"
    assert "siamese serve" in " ".join(config["Cmd"]) and "0.0.0.0" in " ".join(config["Cmd"])
    assert "/ping" in " ".join((inspected.get("Healthcheck") or config["Healthcheck"])["Test"])  # podman's, docker's
    assert not [value for value in config.get("Env", []) if "PASSWORD" in value or "SECRET" in value]
    shown = _in_image(images, "sh", "-c",
                      "id -u; python3 -c 'import pytest' 2>&1 | tail -1; "
                      "find / -xdev \\( -name __pycache__ -o -name .env -o -name config.local -o -name mlflow.db "
                      "-o -name secrets.json -o -path '*/tensorflow/include' \\) -print | head; "
                      "git -C /app log --oneline | wc -l; siamese --help | head -3")
    lines = shown.splitlines()
    assert lines[0] != "0"
    assert "No module named 'pytest'" in lines[1]
    assert lines[2] == "1", f"found in the image: {lines[2:]}"  # nothing found; the project is one commit
    assert "Usage: siamese" in shown


def test_demo_pipeline_runs_inside_the_image(images, tmp_path):
    """`siamese demo-data && dvc repro` in a container, on the image's own project (tiny params mounted over its
    params.yaml so the run is short): every stage runs and a champion is registered in the image's registry."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in TINY_PARAMS.items():
        section, field = key.split(".")
        params[section][field] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    decision = "import json; print('decision=' + json.load(open('artifacts/registration.json'))['decision'])"
    shown = _in_image(images, "sh", "-c", f'siamese demo-data && dvc repro && python3 -c "{decision}"',
                      options=("-v", f"{tmp_path / 'params.yaml'}:/app/params.yaml:ro"))
    for stage in ("validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in shown
    assert "decision=champion" in shown.splitlines()


# ---------------------------------------------------------------- the team stack


@pytest.fixture(scope="module")
def stack(images, engine, tmp_path_factory):
    """container/compose.yaml up under a project of its own, on free ports, with fresh credentials;
    yields (compose runner, the stack's environment); down with its volumes at the end."""
    _, compose, env = engine
    tmp = tmp_path_factory.mktemp("compose")
    _run([sys.executable, str(REPO / "container/make-env.py"), "--file", str(tmp / ".env")], env)
    assert oct((tmp / ".env").stat().st_mode & 0o777) == "0o600"
    credentials = dict(line.split("=", 1) for line in (tmp / ".env").read_text().splitlines() if "=" in line
                       and not line.startswith("#"))
    ports = {name: str(free_port()) for name in ("SIAMESE_HTTP_PORT", "SIAMESE_MLFLOW_PORT", "SIAMESE_PREFECT_PORT",
                                                 "SIAMESE_S3_PORT")}
    stack_env = {**env, **credentials, **ports, "SIAMESE_IMAGE": IMAGE}
    client = dict(line.removeprefix("export ").split("=", 1) for line in _run(
        [sys.executable, str(REPO / "container/make-env.py"), "--client", "--file", str(tmp / ".env")],
        stack_env).splitlines())

    def up_down(*args: str, check: bool = True) -> str:
        return _run([*compose, "-p", PROJECT, "-f", str(REPO / "container/compose.yaml"), *args], stack_env,
                    check=check, timeout=900)

    up_down("down", "-v", check=False)
    started = time.monotonic()
    up_down("up", "-d")
    _wait_http(f"{client['MLFLOW_TRACKING_URI']}/health", 300)
    print(f"\ncompose up, MLflow answering: {time.monotonic() - started:.0f} s")
    yield up_down, stack_env, client
    up_down("down", "-v", check=False)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
        time.sleep(2)


def _recognise(port: str, image: Path) -> dict:
    from pipelines.pyfunc_model import encode_image

    status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"image": encode_image(image)}]})
    assert status == 200, body
    return body["predictions"][0]


def test_compose_stack_runs_the_pipeline_from_the_host_serves_through_nginx_and_keeps_its_data(stack, tmp_path,
                                                                                              write_params):
    from mlflow import MlflowClient

    from support.project import dvc_project

    up_down, stack_env, client = stack
    repo, run, dvc = dvc_project(tmp_path, write_params, client)
    started = time.monotonic()
    run(*dvc, "repro")
    print(f"\ndvc repro against the compose stack: {time.monotonic() - started:.0f} s")
    registry = MlflowClient(client["MLFLOW_TRACKING_URI"])
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert registry.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

    port = stack_env["SIAMESE_HTTP_PORT"]
    started = time.monotonic()
    _wait_http(f"http://127.0.0.1:{port}/ready", 600)
    print(f"\na replica ready behind nginx: {time.monotonic() - started:.0f} s after the champion")
    image = min((repo / "data/demo/train").glob("*/*.png"))  # a gallery image: its own class
    assert _recognise(port, image)["label"] == image.parent.name

    up_down("down")
    up_down("up", "-d")
    _wait_http(f"{client['MLFLOW_TRACKING_URI']}/health", 300)
    kept = MlflowClient(client["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(MODEL, "champion")
    assert kept.version == champion.version
    _wait_http(f"http://127.0.0.1:{port}/ready", 600)  # the replicas download the artifacts from the bucket again
    assert _recognise(port, image)["label"] == image.parent.name
