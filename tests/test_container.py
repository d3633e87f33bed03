"""The container form: the base image made offline from Debian's packages, the image (non-root, trimmed, a
health check, no secrets), the demo pipeline inside it, and the team stack of container/compose.yaml brought up,
used from the host through its published ports, taken down and up with its data kept. Slow: they build images.

They use podman (with podman-compose) or docker (with `docker compose`), whichever works here, and skip with the
reason where neither does; with SIAMESE_CONTAINER_TESTS=required (CI sets it) that reason fails them instead.
Building the base image needs root and debootstrap.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test builds the images: downloads

BASE = "localhost/siamese-base:bookworm"
TAG = "test"
IMAGE = f"localhost/siamese-recognizer:{TAG}"
BUILT = (IMAGE, "localhost/siamese-postgres:15", "localhost/siamese-nginx:bookworm", BASE)  # base last: a parent
MODEL = "siamese-recognizer"
PROJECT = "siamese-container-test"
REQUIRED = os.environ.get("SIAMESE_CONTAINER_TESTS") == "required"


def _cannot(reason: str) -> None:
    """Skip with the reason; fail with it where the container tests are required (CI)."""
    if REQUIRED:
        pytest.fail(f"SIAMESE_CONTAINER_TESTS=required, but {reason}")
    pytest.skip(reason)


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
    skips with the reason when neither runs a container and its compose tool."""
    tmp = tmp_path_factory.mktemp("engine")
    tried = []
    for name, compose in (("podman", ["podman-compose"]), ("docker", ["docker", "compose"])):
        env = _engine_env(tmp) if name == "podman" else dict(os.environ)
        checks = ([name, "info"], [*compose, "version"])
        for check in checks:
            if not shutil.which(check[0]):
                tried.append(f"{check[0]}: not installed")
                break
            done = subprocess.run(check, capture_output=True, text=True, env=env, timeout=120)
            if done.returncode != 0:
                said = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
                tried.append(f"{' '.join(check)}: {said[-1]}")
                break
        else:
            return name, compose, env
    _cannot("no container engine works here: " + "; ".join(tried))


def _run(command: list[str], env: dict, timeout: float = 1800, check: bool = True, **kwargs) -> str:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)
    output = done.stdout + done.stderr
    assert not check or done.returncode == 0, f"{' '.join(command)} failed:\n{output[-5000:]}"
    print(f"\n{' '.join(command)[:100]}: {time.monotonic() - started:.0f} s")
    return output


def _image_ids(engine: str, env: dict) -> list[str]:
    return [subprocess.run([engine, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True,
                           env=env).stdout.strip() for image in BUILT]


@pytest.fixture(scope="module")
def images(engine):
    """The base image from Debian's packages, then the three images on it (container/build-images.sh); the
    images an earlier run built under these names are removed, unless a container still uses them."""
    name, _, env = engine
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        _cannot("building the base image needs root and debootstrap (apt-get install debootstrap)")
    earlier = _image_ids(name, env)
    _run([str(REPO / "container/base-image.sh"), BASE], {**env, "ENGINE": name})
    cert = os.environ.get("PIP_CERT", "")  # a TLS-intercepting proxy's CA bundle, handed to pip as a build secret
    print(_run([str(REPO / "container/build-images.sh")],
               {**env, "ENGINE": name, "BASE_IMAGE": BASE, "TAG": TAG, "PIP_CERT": cert if Path(cert).is_file() else ""}))
    now = _image_ids(name, env)
    for old in [image for image in earlier if image and image not in now]:  # in BUILT's order: the base last
        subprocess.run([name, "image", "rm", old], capture_output=True, env=env)
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
    # Nothing of a build, a test or a secret: no pip or home caches, headers, stray bytecode in the project copy,
    # env files, local DVC config or stores. The installed code's bytecode is there, compiled once at build time.
    assert _in_image(images, "id", "-u").split()[0] != "0"
    shown = _in_image(images, "sh", "-c",  # as root, to look into every folder
                      "python3 -c 'import pytest' 2>&1 | tail -1; "
                      "find / -xdev \\( -path '/app/*' -name __pycache__ -o -path '*/.cache' -o -name .env "
                      "-o -name config.local -o -name mlflow.db -o -name secrets.json -o -path '*/tensorflow/include' "
                      "\\) -print | head; "
                      "git -C /app log --oneline | wc -l; "
                      "cd / && python3 -c 'import importlib.util as u, os, pipelines, tensorflow, json as j; "
                      "print(all(os.path.exists(u.cache_from_source(m.__file__)) for m in (pipelines, tensorflow, j)))'"
                      " 2>/dev/null; siamese --help | head -3", options=("-u", "root"))
    lines = shown.splitlines()
    assert "No module named 'pytest'" in lines[0]
    assert lines[1] == "1", f"found in the image: {lines[1:]}"  # nothing found; the project is one commit
    assert lines[2] == "True", "the installed code or the standard library has no bytecode"
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
    """container/compose.yaml up under a project of its own, as a user brings it up: the file with the env file
    make-env.py writes beside it (fresh credentials, and free ports added to it); yields (compose runner, the env
    file's ports, the host's client exports); down with its volumes at the end."""
    _, compose, env = engine
    tmp = tmp_path_factory.mktemp("compose")
    shutil.copy(REPO / "container/compose.yaml", tmp / "compose.yaml")
    _run([sys.executable, str(REPO / "container/make-env.py"), "--file", str(tmp / ".env")], env)
    assert oct((tmp / ".env").stat().st_mode & 0o777) == "0o600"
    ports = {name: str(free_port()) for name in ("SIAMESE_HTTP_PORT", "SIAMESE_MLFLOW_PORT", "SIAMESE_PREFECT_PORT",
                                                 "SIAMESE_S3_PORT")}
    with open(tmp / ".env", "a") as settings:
        settings.writelines(f"{key}={value}\n" for key, value in {**ports, "SIAMESE_IMAGE": IMAGE}.items())
    client = dict(line.removeprefix("export ").split("=", 1) for line in _run(
        [sys.executable, str(REPO / "container/make-env.py"), "--client", "--file", str(tmp / ".env")],
        env).splitlines() if line.startswith("export "))

    def up_down(*args: str, check: bool = True) -> str:
        return _run([*compose, "-p", PROJECT, "-f", str(tmp / "compose.yaml"), *args], env, check=check, timeout=900)

    up_down("down", "-v", check=False)
    started = time.monotonic()
    up_down("up", "-d")
    _wait_http(f"{client['MLFLOW_TRACKING_URI']}/health", 300)
    print(f"\ncompose up, MLflow answering: {time.monotonic() - started:.0f} s")
    yield up_down, ports, client
    up_down("down", "-v", check=False)


def _wait_http(url: str, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read()
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
        time.sleep(1)


def _recognise(port: str, image: Path) -> dict:
    from pipelines.pyfunc_model import encode_image  # lazy: loads MLflow, which the skipped runs need not

    status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"image": encode_image(image)}]})
    assert status == 200, body
    return body["predictions"][0]


def _containers(engine: str, env: dict) -> dict[str, dict]:
    """The stack's containers by service: podman-compose and docker compose both label them."""
    names = _run([engine, "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"], env).split()
    return {item["Config"]["Labels"]["com.docker.compose.service"]: item
            for item in json.loads(_run([engine, "inspect", *names], env))}


def _healthy(engine: str, env: dict, container: str, timeout: float = 120) -> bool:
    """Whether the container's own health check passes: run now by podman (it schedules checks with systemd
    timers, which a machine without systemd lacks), awaited from docker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine == "podman":
            if subprocess.run([engine, "healthcheck", "run", container], env=env, capture_output=True).returncode == 0:
                return True
        elif _run([engine, "inspect", "-f", "{{.State.Health.Status}}", container], env).strip() == "healthy":
            return True
        time.sleep(2)
    return False


def test_compose_stack_runs_the_pipeline_from_the_host_serves_through_nginx_and_keeps_its_data(
        engine, stack, tmp_path, write_params, monkeypatch):
    from mlflow import MlflowClient  # lazy: loads MLflow, which the skipped runs need not

    from support.project import dvc_project

    name, _, engine_env = engine
    up_down, ports, client = stack
    for key, value in client.items():  # this process's MLflow client uses the stack as the user's shell would
        monkeypatch.setenv(key, value)
    repo, run, dvc = dvc_project(tmp_path, write_params, client)
    started = time.monotonic()
    run(*dvc, "repro")
    print(f"\ndvc repro against the compose stack: {time.monotonic() - started:.0f} s")
    registry = MlflowClient()
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert registry.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

    port = ports["SIAMESE_HTTP_PORT"]
    started = time.monotonic()
    _wait_http(f"http://127.0.0.1:{port}/ready", 600)
    print(f"\na replica ready behind nginx: {time.monotonic() - started:.0f} s after the champion")
    image = min((repo / "data/demo/train").glob("*/*.png"))  # a gallery image: its own class
    assert _recognise(port, image)["label"] == image.parent.name

    # Every service passes its own health check; the Prefect server answers and its worker polls the pool.
    containers = _containers(name, engine_env)
    assert set(containers) == {"postgres", "s3", "mlflow", "prefect", "worker", "serve-1", "serve-2", "nginx"}
    unhealthy = [service for service, item in containers.items() if not _healthy(name, engine_env, item["Id"])]
    assert not unhealthy, f"health check fails: {unhealthy}"
    pool = json.loads(_wait_http(f"{client['PREFECT_API_URL']}/work_pools/siamese", 120))
    assert pool["status"] == "READY", pool
    # Published: nginx on every interface; MLflow, Prefect and S3 on loopback only; nothing else.
    published = {service: {binding["HostIp"] or "0.0.0.0" for bindings in item["NetworkSettings"]["Ports"].values()
                           for binding in bindings or ()} for service, item in containers.items()}
    assert published.pop("nginx") - {"::"} == {"0.0.0.0"}, published
    assert {service: hosts for service, hosts in published.items() if hosts} == {
        "mlflow": {"127.0.0.1"}, "prefect": {"127.0.0.1"}, "s3": {"127.0.0.1"}}

    # The S3 store is the team's DVC remote too (the commands docs/how-to/containers.md gives).
    run(*dvc, "remote", "add", "--local", "--default", "--force", "stack", "s3://siamese/dvc")
    run(*dvc, "remote", "modify", "--local", "stack", "endpointurl", client["MLFLOW_S3_ENDPOINT_URL"])
    run(*dvc, "push", "-q")

    started = time.monotonic()
    up_down("down")
    up_down("up", "-d")
    _wait_http(f"{client['MLFLOW_TRACKING_URI']}/health", 300)
    kept = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    assert kept.version == champion.version
    stored = {item.path for item in MlflowClient().list_artifacts(champion.run_id)}
    assert stored, "the champion's run lists no artifacts after down and up"
    assert "in sync" in run(*dvc, "status", "--cloud")  # the pushed data and outputs are still in the bucket
    _wait_http(f"http://127.0.0.1:{port}/ready", 600)  # the replicas download the artifacts from the bucket again
    print(f"\ndown, up, a replica ready again: {time.monotonic() - started:.0f} s")
    assert _recognise(port, image)["label"] == image.parent.name
