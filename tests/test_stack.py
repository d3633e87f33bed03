"""The shared stack for real on loopback ports: `siamese stack up` (PostgreSQL, moto's S3 server, mlflow server,
Prefect server and worker), the whole pipeline against it with nothing but environment variables, a DVC remote
on its bucket, and basic auth. Skipped, with the reason, where PostgreSQL's programs or the packages are absent."""

from __future__ import annotations

import filecmp
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipelines import stack, stack_services, stack_state, supervisor
from pipelines.cli import app
from pipelines.files import content_hash

from support.tiny import TINY_PARAMS

MISSING = stack_services.missing()
needs_stack = pytest.mark.skipif(MISSING is not None, reason=f"shared stack not available: {MISSING}")

REPO = Path(__file__).resolve().parents[1]
MODEL = "siamese-recognizer"


def test_start_up_failure_names_the_service_and_shows_its_log_tail(tmp_path):
    log = tmp_path / "demo.log"
    service = supervisor.start([sys.executable, "-c", "print('port already in use'); raise SystemExit(3)"], log,
                           dict(os.environ), tmp_path)
    expected = r"(?s)^demo exited during start-up \(not listening\); last lines of .*demo.log:\nport already in use"
    with pytest.raises(stack.StackError, match=expected):
        supervisor.wait_healthy("demo", lambda: "not listening", service, log, timeout=30)
    assert not supervisor.stop(service)  # already gone: nothing to stop


def test_ports_prefer_last_run_then_defaults_then_anyfree_port():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = supervisor.pick_ports(stack_state.SERVERS, busy, {"mlflow": busy})
    assert ports["postgres"] != busy and ports["mlflow"] != busy and len(set(ports.values())) == 4


def test_missing_postgres_is_one_line_reason(monkeypatch):
    monkeypatch.setattr(stack_services, "pg_bin", lambda name: None)
    assert stack_services.missing() == "PostgreSQL's initdb not found (on PATH or in /usr/lib/postgresql/*/bin)"
    with pytest.raises(stack.StackError, match="^cannot start the stack: PostgreSQL's initdb not found"):
        stack.up("unused-root")


@pytest.mark.skipif(os.geteuid() != 0, reason="the worker's user is chosen only when root starts the stack")
def test_as_root_the_worker_runs_flows_as_the_project_owner_and_never_picks_root_itself(tmp_path):
    import pwd

    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(stack.StackError, match="would run every flow as root: pass --worker-user USER"):
        stack_services.worker_user(project, None)  # a root-owned checkout
    assert stack_services.worker_user(project, "root") == "root"  # only when named
    with pytest.raises(stack.StackError, match="no such user"):
        stack_services.worker_user(project, "no-such-user-here")
    someone = next(u.pw_name for u in pwd.getpwall() if u.pw_uid not in (0, os.geteuid()) and u.pw_name != "root")
    os.chown(project, pwd.getpwnam(someone).pw_uid, -1)
    assert stack_services.worker_user(project, None) == someone
    assert supervisor.as_user(someone, ["prefect", "worker"]) == ["runuser", "-u", someone, "--", "prefect", "worker"]
    assert supervisor.as_user("root", ["prefect"]) == ["prefect"]
    with pytest.raises(stack.StackError, match="belongs to root"):  # `stack up` refuses before starting anything
        os.chown(project, 0, -1)
        cwd = os.getcwd()
        os.chdir(project)
        try:
            stack.up(tmp_path / "stack-root")
        finally:
            os.chdir(cwd)
    assert not (tmp_path / "stack-root" / "postgres").exists()


def test_stack_up_says_where_the_credentials_are_and_never_prints_them(tmp_path, monkeypatch):
    """The command's output alone: `up` itself (which starts the services) returns a stack's state here."""
    from typer.testing import CliRunner

    root = tmp_path / "stack"
    root.mkdir()
    state = stack_state.new_stack(root, tmp_path, True, dict(zip(stack_state.SERVERS, range(54320, 54324))),
                                  getpass.getuser())
    state.update(state="up", up_seconds=1.0, env_file=str(stack_state.write_env_file(state)))
    monkeypatch.setattr(stack, "up", lambda *args, **kwargs: state)
    shown = CliRunner().invoke(app, ["stack", "up", "--auth", "--root", str(root)])
    assert shown.exit_code == 0, shown.output
    keys = json.loads((root / "secrets.json").read_text())
    assert not [name for name, value in keys.items() if value in shown.output and name != "aws_access_key_id"]
    assert f". {root / 'env'}" in shown.output and "readable by you only" in shown.output
    exported = (root / "env").read_text()
    for value in (keys["aws_secret_access_key"], keys["mlflow_user_password"], keys["prefect_api_password"]):
        assert value in exported
    assert oct((root / "env").stat().st_mode & 0o777) == "0o600"


def test_s3_objects_survive_kill_9_of_the_server_and_a_clean_restart(tmp_path):
    """The stack's S3 recipe alone: what a signed client wrote comes back byte for byte after the server is
    killed with SIGKILL and started again (from its journal), and after a stop and start (down, up)."""
    for module in ("moto.server", "flask_cors", "boto3"):
        pytest.importorskip(module, reason="the stack's S3 server needs moto[server] and boto3")
    from boto3.s3.transfer import TransferConfig

    root = tmp_path / "stack"
    root.mkdir()
    state = stack_state.new_stack(root, tmp_path, False, supervisor.pick_ports(stack_state.SERVERS, None, {}),
                                  getpass.getuser())
    earlier = root / "s3" / "bucket" / "saved by an earlier down.txt"  # how the stack kept the bucket before
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"saved")
    s3 = stack_services.RECIPES["s3"]

    def start() -> None:
        s3.start(state, stack_state.server_env(state))
        s3.ready(state)

    start()
    try:
        assert not earlier.parent.exists(), "the earlier copy is in the journal now"
        client = stack_services.s3_client(state)
        big = os.urandom(11 * 2**20)  # three parts of a multipart upload
        (tmp_path / "big").write_bytes(big)
        client.upload_file(str(tmp_path / "big"), stack_state.BUCKET, "models/big.bin",
                           Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
        client.put_object(Bucket=stack_state.BUCKET, Key="a key/with é+x", Body=b"small", Metadata={"run": "7"})
        client.copy_object(Bucket=stack_state.BUCKET, Key="copied", CopySource=f"{stack_state.BUCKET}/a key/with é+x")
        client.put_object(Bucket=stack_state.BUCKET, Key="deleted", Body=b"gone")
        client.delete_object(Bucket=stack_state.BUCKET, Key="deleted")

        def read_back() -> None:
            keys = [item["Key"] for item in client.list_objects_v2(Bucket=stack_state.BUCKET)["Contents"]]
            assert sorted(keys) == ["a key/with é+x", "copied", "models/big.bin", earlier.name]
            for key, data in (("models/big.bin", big), ("copied", b"small"), (earlier.name, b"saved")):
                assert client.get_object(Bucket=stack_state.BUCKET, Key=key)["Body"].read() == data, key
            small = client.get_object(Bucket=stack_state.BUCKET, Key="a key/with é+x")
            assert small["Body"].read() == b"small" and small["Metadata"] == {"run": "7"}

        log = Path(state["services"]["s3"]["log"])
        modes = {path: oct(path.stat().st_mode & 0o777) for path in (log.parent, log, root / "s3", root / "s3" / "journal")}
        assert list(modes.values()) == ["0o700", "0o600", "0o700", "0o600"], modes
        os.kill(state["services"]["s3"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while supervisor.is_ours(state["services"]["s3"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s3.check(state) is not None, "the killed server still answers"
        start()
        read_back()
        assert s3.stop(state)
        start()
        read_back()
    finally:
        s3.stop(state)


def _stack_root() -> Path:
    """A fresh folder PostgreSQL can reach: as root it runs as user 'postgres', who cannot enter pytest's tmp."""
    base = Path(tempfile.mkdtemp(prefix="siamese-stack-"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def shared_stack():
    """`siamese stack up` into a temporary folder, on free ports; `down` at the end."""
    base = _stack_root()
    started = time.monotonic()
    up = stack.up(base / "stack", base_port=None, worker=getpass.getuser())  # as root: named, not picked
    up["measured_up_s"] = round(time.monotonic() - started, 1)
    print(f"\nstack up in {up['measured_up_s']} s: " + ", ".join(
        f"{name} {s['port']}" for name, s in up["services"].items() if s.get("port")))
    yield up
    stack.down(base / "stack")
    shutil.rmtree(base, ignore_errors=True)


def _write_tiny_params(path: Path) -> Path:
    """params.yaml with conftest's tiny settings (a module-scoped fixture cannot use the `write_params` fixture)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for key, value in TINY_PARAMS.items():
        section, name = key.split(".")
        data[section][name] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pipeline(shared_stack, tmp_path_factory):
    """The tiny project as a git + DVC clone, `dvc repro` run against the stack; (repo, run, dvc, env)."""
    from support.project import dvc_project

    env = stack_state.client_env(shared_stack)
    repo, run, dvc = dvc_project(tmp_path_factory.mktemp("stack-project"), _write_tiny_params, env)
    started = time.monotonic()
    run(*dvc, "repro")
    print(f"\ndvc repro against the stack: {time.monotonic() - started:.1f} s")
    return repo, run, dvc, env


def _s3(stack_info: dict):
    import boto3

    env = stack_state.client_env(stack_info)
    return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _keys(stack_info: dict, prefix: str) -> list[str]:
    pages = _s3(stack_info).get_paginator("list_objects_v2").paginate(Bucket=stack_state.BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@needs_stack
def test_stack_comes_up_healthy_and_prints_how_to_use_it(shared_stack):
    from typer.testing import CliRunner

    root = Path(shared_stack["root"])
    assert stack.status(root) == dict.fromkeys(stack_state.SERVICES)
    saved = json.loads((root / "stack.json").read_text())
    assert saved["state"] == "up" and saved["env_file"] == str(root / "env")
    assert oct(root.stat().st_mode & 0o777) == ("0o711" if os.geteuid() == 0 else "0o700")
    private = [path for path in root.rglob("*") if path.name != ".gitignore" and path.stat().st_mode & 0o077]
    assert not private, [f"{path} {oct(path.stat().st_mode & 0o777)}" for path in private[:10]]
    assert (root / "env").read_text() == stack_state.exports(shared_stack) + "\n"
    ports = [saved["services"][name]["port"] for name in ("postgres", "s3", "mlflow", "prefect")]
    assert len(set(ports)) == 4
    assert all(Path(s["log"]).is_file() and s["pid"] for s in saved["services"].values())

    runner = CliRunner()
    shown = runner.invoke(app, ["stack", "status", "--root", str(root)])
    assert shown.exit_code == 0 and shown.output.count("healthy") == 5, shown.output
    assert saved["services"]["mlflow"]["url"] in shown.output
    exports = runner.invoke(app, ["stack", "env", "--root", str(root)]).output
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "PREFECT_API_URL"):
        assert f"export {name}=" in exports
    again = runner.invoke(app, ["stack", "up", "--root", str(root)])
    assert again.exit_code == 1 and "already running" in again.output

    import psutil  # no password on any command line of the stack's processes (ps shows them to every user)

    password = json.loads((root / "secrets.json").read_text())["postgres_password"]
    processes = [psutil.Process(s["pid"]) for s in saved["services"].values() if s.get("pid")]
    processes += [child for process in list(processes) for child in process.children(recursive=True)]
    assert processes and not [p.pid for p in processes if password in " ".join(p.cmdline())]


@needs_stack
def test_each_service_logs_in_to_postgres_as_a_role_without_privileges(shared_stack):
    import psycopg2
    import psycopg2.errors

    keys = json.loads((Path(shared_stack["root"]) / "secrets.json").read_text())
    port = shared_stack["services"]["postgres"]["port"]
    logins = {"mlflow": keys["postgres_password"], "prefect": keys["prefect_db_password"]}

    def connect(role, database):
        return psycopg2.connect(host="127.0.0.1", port=port, user=role, password=logins[role], dbname=database)

    for role, other in (("mlflow", "prefect"), ("prefect", "mlflow")):
        with connect(role, role) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert cursor.fetchone() == (False, False, False)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cursor.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        connection.close()
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            connect(role, other)  # no CONNECT on the other service's database


@needs_stack
def test_s3_answers_only_requests_signed_with_the_stacks_key_and_its_admin_api_is_closed(shared_stack):
    import urllib.error
    import urllib.request

    import boto3
    import botocore
    from botocore.config import Config

    env = stack_state.client_env(shared_stack)
    url = env["MLFLOW_S3_ENDPOINT_URL"]

    def client(key, secret, signature_version="s3v4"):
        return boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=Config(signature_version=signature_version))

    good = client(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    good.put_object(Bucket=stack_state.BUCKET, Key="signed check/a+b.txt", Body=b"kept")
    unsigned = client("any", "any", botocore.UNSIGNED)
    for attempt, message in (
        (lambda: client(env["AWS_ACCESS_KEY_ID"], "wrong").list_objects_v2(Bucket=stack_state.BUCKET), "does not match"),
        (lambda: client("someone-else", env["AWS_SECRET_ACCESS_KEY"]).list_objects_v2(Bucket=stack_state.BUCKET),
         "unknown access key"),
        (lambda: unsigned.list_objects_v2(Bucket=stack_state.BUCKET), "must be signed"),
        (lambda: unsigned.delete_object(Bucket=stack_state.BUCKET, Key="signed check/a+b.txt"), "must be signed"),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            attempt()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        assert message in refused.value.response["Error"]["Message"]

    # presigned URLs (the MLflow server hands them out for downloads): the stack's key only, and not expired
    params = {"Bucket": stack_state.BUCKET, "Key": "signed check/a+b.txt"}
    assert urllib.request.urlopen(good.generate_presigned_url("get_object", Params=params)).read() == b"kept"
    forged = client(env["AWS_ACCESS_KEY_ID"], "wrong").generate_presigned_url("get_object", Params=params)
    expired = good.generate_presigned_url("get_object", Params=params, ExpiresIn=1)
    time.sleep(2)
    for refused_url in (forged, expired):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(refused_url)
        assert error.value.code == 403
    s3_log = Path(shared_stack["services"]["s3"]["log"]).read_text()
    assert "/signed%20check/a%2Bb.txt?X-Amz-Algorithm&X-Amz-Credential" in s3_log, s3_log[-2000:]
    assert "X-Amz-Signature=" not in s3_log and "Signature=" not in s3_log  # no URL anyone could use again
    assert supervisor.http(f"{url}/moto-api/reset", method="POST")[0] == 404  # the admin API is closed
    assert good.get_object(**params)["Body"].read() == b"kept"
    good.delete_object(**params)


@needs_stack
def test_stack_status_checks_the_bucket_not_just_the_port(shared_stack):
    s3 = _s3(shared_stack)
    assert not _keys(shared_stack, ""), "runs before the pipeline fills the bucket"
    s3.delete_bucket(Bucket=stack_state.BUCKET)  # as a reset of the S3 server would leave it: up, without the bucket
    try:
        assert stack.status(shared_stack["root"])["s3"] == f"bucket '{stack_state.BUCKET}' answered 404 (it is gone)"
    finally:
        s3.create_bucket(Bucket=stack_state.BUCKET)
    assert stack.status(shared_stack["root"])["s3"] is None


@needs_stack
def test_stack_status_writes_through_each_service_and_a_service_that_cannot_write_is_down(shared_stack):
    """The S3 server's journal cannot grow (a file-size limit on the running server, as a full disk): the
    server still answers, but S3, and MLflow whose artifacts go there, are reported down in one line each."""
    import psutil
    from typer.testing import CliRunner

    root = Path(shared_stack["root"])
    assert stack.status(root) == dict.fromkeys(stack_state.SERVICES)
    assert not _keys(shared_stack, ""), "the probes delete what they write"
    s3_server = psutil.Process(shared_stack["services"]["s3"]["pid"])
    s3_server.rlimit(psutil.RLIMIT_FSIZE, ((root / "s3" / "journal").stat().st_size, psutil.RLIM_INFINITY))
    try:
        health = stack.status(root)
        shown = CliRunner().invoke(app, ["stack", "status", "--root", str(root)])
    finally:
        s3_server.rlimit(psutil.RLIMIT_FSIZE, (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY))
    assert health["s3"].startswith(f"cannot write to bucket '{stack_state.BUCKET}': InsufficientStorage"), health
    assert health["mlflow"].startswith("cannot write an artifact: PUT answered 500"), health
    assert health["postgres"] is None and health["prefect"] is None
    assert shown.exit_code == 1 and [line.split()[:2] for line in shown.output.splitlines()] == [
        ["postgres", "healthy"], ["s3", "DOWN"], ["mlflow", "DOWN"], ["prefect", "healthy"], ["worker", "healthy"]]
    assert stack.status(root) == dict.fromkeys(stack_state.SERVICES)


@needs_stack
@pytest.mark.slow  # the pipeline against the stack (dvc repro, about 70 s, shared by the next three): CI runs it
def test_dvc_repro_against_the_stack_registers_a_champion_stored_in_the_bucket(shared_stack, pipeline):
    from mlflow import MlflowClient

    repo, run, _, env = pipeline
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    registration = json.loads((repo / "artifacts/registration.json").read_text())
    assert (registration["version"], registration["decision"]) == (champion.version, "champion")
    mlflow_run = client.get_run(champion.run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = _keys(shared_stack, "mlartifacts/")
    assert any(f"/{champion.run_id}/artifacts/" in key for key in stored), stored[:10]
    model_id = champion.source.removeprefix("models:/")
    assert any(f"/models/{model_id}/artifacts/" in key for key in stored), "the registered model is not in the bucket"
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    image = min((repo / "data/demo/train").glob("*/*.png"))  # a gallery image: its own class, distance 0
    shown = run("siamese", "predict", str(image), "--model", f"models:/{MODEL}@champion", "--json")
    answer = json.loads(next(line for line in shown.splitlines() if line.startswith("[{")))
    assert answer[0]["label"] == image.parent.name and answer[0]["distance"] < 1e-4


@needs_stack
@pytest.mark.slow
def test_mlflow_models_serve_pulls_the_champion_from_the_object_store(pipeline):
    from pipelines.pyfunc_model import encode_image

    from support.http import free_port, post_json, stop_group, wait_until_ready

    repo, _, _, env = pipeline
    port, log_path = free_port(), repo.parent / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env={**os.environ, **env, "PATH": path}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True, cwd=repo.parent)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, server, log_path)
        image = min((repo / "data/demo/train").glob("*/*.png"))
        status, body = post_json(f"{base}/invocations", {"dataframe_records": [{"image": encode_image(image)}]})
        assert status == 200, body
        assert body["predictions"][0]["label"] == image.parent.name
    finally:
        stop_group(server)


@needs_stack
@pytest.mark.slow
def test_dvc_push_and_pull_through_the_bucket_into_a_fresh_clone(shared_stack, pipeline):
    repo, run, dvc, env = pipeline
    for command in stack_state.dvc_remote_commands(shared_stack):
        run(*dvc, *command.split()[1:])
    assert "s3://siamese/dvc" in (repo / ".dvc/config.local").read_text()
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline outputs")
    run(*dvc, "push")
    assert _keys(shared_stack, "dvc/"), "dvc push wrote nothing to the bucket"

    clone = repo.parent / "clone"
    run("git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data/demo").exists()
    for command in stack_state.dvc_remote_commands(shared_stack):
        subprocess.run([sys.executable, "-m", "dvc", *command.split()[1:]], cwd=clone, env={**os.environ, **env},
                       check=True, capture_output=True)
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=clone, env={**os.environ, **env},
                            capture_output=True, text=True, check=False)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    for folder in ("data/demo", "artifacts/bundle"):
        _assert_same_tree(repo / folder, clone / folder)


def _assert_same_tree(left: Path, right: Path) -> None:
    files = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(left, right, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@needs_stack
@pytest.mark.slow  # two full stack start-ups, about 2 minutes: run with -m slow
def test_basic_auth_refuses_anonymous_requests_and_the_registry_survives_a_restart(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pipelines import registry, tracking

    from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle

    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth])")
    base = _stack_root()
    root = base / "stack"
    try:
        env = stack_state.client_env(stack.up(root, auth=True, base_port=None, worker=getpass.getuser()))
        assert stack.status(root) == dict.fromkeys(stack_state.SERVICES)  # MLflow's probe logs in as admin
        url = env["MLFLOW_TRACKING_URI"]
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert supervisor.http(search)[0] == 401
        assert supervisor.http(search, auth=(env["MLFLOW_TRACKING_USERNAME"], "not-the-password"))[0] == 401
        assert supervisor.http(search, auth=(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]))[0] == 200
        flows = env["PREFECT_API_URL"] + "/flows/filter"  # Prefect's API: no login, no access
        user, password = env["PREFECT_API_AUTH_STRING"].split(":", 1)
        assert supervisor.http(flows, method="POST")[0] == 401
        assert supervisor.http(flows, auth=(user, "not-the-password"), method="POST")[0] == 401
        assert supervisor.http(flows, auth=(user, password), method="POST")[0] == 200

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
            tracking.ensure_experiment("siamese-auth-check")
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.setenv(name, env[name])
        assert tracking.ensure_experiment("siamese-auth-check")
        monkeypatch.chdir(tmp_path)
        bundle = make_tiny_bundle(tmp_path)
        done = register_bundle(pipeline_params("secured"), bundle.path, {"top1": 1.0}, bundle.history, [], {},
                                       score_champion=logged_scorer())
        assert done["decision"] == "champion"
        before = shutil.copytree(registry.download_bundle(registry.champion_uri("secured")), tmp_path / "before")

        assert "mlflow" in stack.down(root)
        assert stack.down(root) == []  # safe to call twice
        assert set(stack.status(root).values()) == {"stopped"}
        assert b".keras" in (root / "s3" / "journal").read_bytes(), "the S3 server's journal lacks the model"

        # a restart: PostgreSQL keeps the registry and the users, the bucket comes back from the journal
        assert stack_state.client_env(stack.up(root, auth=True, base_port=None, worker=getpass.getuser())) == env  # same ports and credentials
        assert supervisor.http(search)[0] == 401
        _assert_same_tree(before, registry.download_bundle(registry.champion_uri("secured")))
    finally:
        stack.down(root)
        shutil.rmtree(base, ignore_errors=True)


RUN_RETRAINING = """
from prefect.deployments import run_deployment

run = run_deployment("siamese-retraining/siamese-retraining", timeout=420)
print("STATE", run.state.type.value, run.id)
"""


@needs_stack
@pytest.mark.slow
def test_the_worker_runs_the_retraining_deployment_and_registers_on_the_tracking_server(pipeline):
    """prefect.yaml deployed to the stack's Prefect server; its worker (pool 'siamese') runs it on new data."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo, run, dvc, env = pipeline
    shutil.copy(REPO / "prefect.yaml", repo)
    some_class = sorted((repo / "data/demo/train").iterdir())[0]  # new data, so the retraining trains
    shutil.copy(sorted(some_class.glob("*.png"))[0], some_class / "new-drawing.png")
    run(*dvc, "add", "-q", "data/demo")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "a new drawing and the deployment")
    deploy_env = {**os.environ, **env, "PWD": str(repo)}  # prefect.yaml's pull step runs the flow in {{ $PWD }}
    deployed = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=repo, env=deploy_env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("siamese-retraining/siamese-retraining")
    assert set(deployment.tags) == {"siamese", "retraining"} and deployment.work_pool_name == "siamese"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.schedules[0].schedule.cron == yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]["cron"]

    started, started_at = time.monotonic(), time.time()
    done = subprocess.run([sys.executable, "-c", RUN_RETRAINING], cwd=repo, env=deploy_env, capture_output=True,
                          text=True, timeout=480, check=False)
    state, flow_run_id = done.stdout.split("STATE ", 1)[1].split()[:2] if "STATE " in done.stdout else ("?", "?")
    assert state == "COMPLETED", done.stdout[-2000:] + done.stderr[-3000:]
    print(f"\nretraining deployment run by the worker in {time.monotonic() - started:.1f} s")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    newest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert newest.creation_timestamp / 1000 > started_at, "the worker's run registered a new version"
    trained = client.get_run(newest.run_id)
    new_data = f"{content_hash(repo / 'data/demo/train')}+{content_hash(repo / 'data/demo/test')}"
    assert trained.data.tags["data_hash"] == new_data and trained.info.status == "FINISHED"
    assert trained.data.tags["prefect.flow_run_id"], "the run links to its Prefect flow run"
