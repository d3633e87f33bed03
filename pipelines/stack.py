"""The shared stack on one machine: ``siamese stack up | status | env | down``.

PostgreSQL (the MLflow and Prefect databases), an S3 server (moto), ``mlflow server`` (runs
and registry in PostgreSQL, artifacts proxied to the S3 bucket) and a Prefect server with a
process worker on pool ``siamese`` run as background processes on loopback ports. Their
data, logs, ``stack.json`` (ports, pids, URLs, logs) and ``secrets.json`` live under one
folder, ``.siamese-stack/`` by default. The pipeline uses the stack through environment
variables only (:func:`client_env`); ``--auth`` runs the tracking server with MLflow's
basic-auth app and a pipeline user.

moto keeps objects in memory: ``down`` saves the bucket to ``s3/bucket/`` and ``up`` loads it
back, so runs, models and DVC data outlive a restart (not a crash or ``kill -9`` of the S3 server).
"""

from __future__ import annotations

import base64
import getpass
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer

from siamese_core.io import atomic_dir, atomic_path

HOST = "127.0.0.1"
DEFAULT_ROOT = ".siamese-stack"
BASE_PORT = 54320  # postgres 54320, s3 54321, mlflow 54322, prefect 54323, where free
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")
BUCKET = "siamese"
WORK_POOL = "siamese"
PIPELINE_USER = "siamese"
PREFECT_USER = "siamese"  # the Prefect API's basic-auth login with --auth
PG_ADMIN = "siamese_admin"  # PostgreSQL's superuser; the services log in as roles without privileges
STARTUP_TIMEOUT_S = 180
_NO_BUCKET = ("404", "NoSuchBucket")
STOP_TIMEOUT_S = 20


class StackError(RuntimeError):
    """A service of the stack failed to start, stop or answer; the message is one line (plus a log tail)."""


# ---------------------------------------------------------------- prerequisites


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return candidates[-1] if candidates else None


def missing() -> str | None:
    """Why the stack cannot start on this machine (a missing program or package), or None."""
    for name in ("initdb", "pg_ctl"):
        if pg_bin(name) is None:
            return f"PostgreSQL's {name} not found (on PATH or in /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0 and not _has_user("postgres"):
        return "running as root, and there is no 'postgres' user to run PostgreSQL as"
    for module, package in (("moto.server", "moto"), ("flask_cors", "moto's server (flask-cors)"),
                            ("psycopg2", "psycopg2-binary"), ("mlflow", "mlflow"), ("prefect", "prefect"),
                            ("boto3", "boto3")):
        try:
            __import__(module)
        except ImportError:
            return f"Python package {package} is not installed"
    return None


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------- small helpers


def _as_user(user: str, command: list[str]) -> list[str]:
    """``command`` run as ``user`` when this process is root and ``user`` is another; else as it is."""
    return ["runuser", "-u", user, "--", *command] if os.geteuid() == 0 and user != getpass.getuser() else command


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the ``postgres`` user then."""
    return _as_user("postgres", command)


def worker_user(project: Path, requested: str | None) -> str:
    """Who the Prefect worker, and so every flow it runs, runs as.

    A stack started by a normal user runs it as that user. A stack started by root runs it as
    ``requested``, else as the owner of the project folder (the checkout the flows write to); it
    refuses to pick root itself: flows from the Prefect server would run with every privilege.
    """
    import pwd

    if os.geteuid() != 0:
        return getpass.getuser()
    user = requested or pwd.getpwuid(project.stat().st_uid).pw_name
    if user == "root" and requested != "root":
        raise StackError(f"the stack runs as root and {project} belongs to root, so the worker would run every flow "
                         "as root: pass --worker-user USER (a user who can write the project folder and run this "
                         "Python), or --worker-user root to accept that")
    if not _has_user(user):
        raise StackError(f"--worker-user {user}: no such user on this machine")
    return user


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(base_port: int | None, previous: dict[str, int]) -> dict[str, int]:
    """A port per service: the one it had last time, else ``base_port + i``, else any free port."""
    ports: dict[str, int] = {}
    for index, name in enumerate(SERVICES[:-1]):
        wanted = [previous.get(name), base_port + index if base_port else None]
        port = next((p for p in wanted if p and p not in ports.values() and _port_free(p)), None)
        while port is None or port in ports.values():
            with socket.socket() as sock:
                sock.bind((HOST, 0))
                port = sock.getsockname()[1]
        ports[name] = port
    return ports


def _write_private(path: Path, data: dict) -> None:
    """JSON readable by this user only (it holds passwords), replaced atomically."""
    with atomic_path(path) as tmp:
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(data, indent=2))


def _secrets(root: Path) -> dict[str, str]:
    """The stack's passwords and keys, made once and kept in ``secrets.json``."""
    path = root / "secrets.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    names = ("postgres_admin_password", "postgres_password", "prefect_db_password", "aws_secret_access_key",
             "mlflow_admin_password", "mlflow_user_password", "prefect_api_password", "flask_secret_key")
    made = {"aws_access_key_id": "siamese-stack", **{name: secrets.token_urlsafe(24) for name in names}, **kept}
    if made != kept:  # a new stack, or one made before a key was added
        _write_private(path, made)
    return made


def _tail(log: Path | str, lines: int = 25) -> str:
    try:
        text = Path(log).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text[-lines:])


def _http(url: str, auth: tuple[str, str] | None = None, method: str = "GET", timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of one request; (0, b"") when nothing answers."""
    request = urllib.request.Request(url, method=method)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, ValueError):
        return 0, b""


def _start(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> dict:
    """Start a background process in its own process group, output to ``log``; its pid and start time."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True)
    return {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}


def _group_members(pgid: int) -> list:
    """The live (not zombie) processes of process group ``pgid``."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _ours(service: dict) -> bool:
    """Whether the recorded process group still runs what this stack started (pids get reused)."""
    import psutil

    pid = service.get("pid")
    if not pid:
        return False
    try:
        leader = psutil.Process(pid)
        if leader.status() != psutil.STATUS_ZOMBIE:
            return abs(leader.create_time() - service.get("started", 0)) < 1
    except psutil.NoSuchProcess:
        pass
    return bool(_group_members(pid))  # leader gone, children left: the group id cannot have been reused


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _stop_group(service: dict) -> bool:
    """SIGTERM the service's process group, SIGKILL what is left after a while; False if it was not running."""
    if not _ours(service):
        return False
    pgid = service["pid"]
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            if not _group_members(pgid):
                return True
            time.sleep(0.2)
    _reap(pgid)
    return True


def _wait(name: str, check, service: dict, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``check()`` (None when healthy, else what is wrong) until it passes; on failure raise with the log tail."""
    deadline = time.monotonic() + timeout
    problem = "not checked"
    while time.monotonic() < deadline:
        problem = check()
        if problem is None:
            return
        if service.get("pid") and not _ours(service):
            raise StackError(f"{name} exited during start-up ({problem}); last lines of {log}:\n{_tail(log)}")
        time.sleep(0.5)
    raise StackError(f"{name} not healthy after {timeout:.0f} s ({problem}); last lines of {log}:\n{_tail(log)}")


# ---------------------------------------------------------------- health checks


def _check_postgres(stack: dict) -> str | None:
    import psycopg2

    pg, key = stack["services"]["postgres"], _secrets(Path(stack["root"]))["postgres_password"]
    try:
        psycopg2.connect(host=HOST, port=pg["port"], user="mlflow", password=key, dbname="mlflow",
                         connect_timeout=3).close()
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _bucket_problem(stack: dict) -> tuple[str, str] | None:
    """None when a HEAD of the bucket with the stack's keys succeeds, else (error code, what went wrong)."""
    import botocore.exceptions

    try:
        _s3_client(stack).head_bucket(Bucket=BUCKET)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        return code, f"bucket '{BUCKET}' answered {code}" + (" (it is gone)" if code in _NO_BUCKET else "")
    except botocore.exceptions.BotoCoreError as exc:
        return "", f"no answer ({type(exc).__name__})"
    return None


def _s3_answers(stack: dict) -> str | None:
    """The S3 server answers the stack's keys (at start-up the bucket may not exist yet)."""
    problem = _bucket_problem(stack)
    return None if problem is None or problem[0] in _NO_BUCKET else problem[1]


def _check_s3(stack: dict) -> str | None:
    """The bucket itself answers (a server that lost it is not healthy)."""
    problem = _bucket_problem(stack)
    return None if problem is None else problem[1]


def _check_mlflow(stack: dict) -> str | None:
    status, body = _http(stack["services"]["mlflow"]["url"] + "/health")
    return None if status == 200 else f"GET /health answered {status or 'nothing'} {body[:80]!r}"


def _prefect_login(stack: dict) -> tuple[str, str] | None:
    """The Prefect API's basic-auth login with --auth, else None."""
    return (PREFECT_USER, _secrets(Path(stack["root"]))["prefect_api_password"]) if stack["auth"] else None


def _check_prefect(stack: dict) -> str | None:
    status, _ = _http(stack["services"]["prefect"]["url"] + "/api/health", auth=_prefect_login(stack))
    return None if status == 200 else f"GET /api/health answered {status or 'nothing'}"


def _check_worker(stack: dict) -> str | None:
    if not _ours(stack["services"]["worker"]):
        return "worker process is not running"
    status, body = _http(f"{stack['services']['prefect']['url']}/api/work_pools/{WORK_POOL}",
                         auth=_prefect_login(stack))
    if status != 200:
        return f"work pool '{WORK_POOL}' answered {status or 'nothing'}"
    pool_status = json.loads(body).get("status")
    return None if pool_status == "READY" else f"work pool '{WORK_POOL}' is {pool_status} (no worker online)"


CHECKS = {"postgres": _check_postgres, "s3": _check_s3, "mlflow": _check_mlflow, "prefect": _check_prefect,
          "worker": _check_worker}


# ---------------------------------------------------------------- the services


def _bin(name: str) -> str:
    """A console script of this environment (``prefect``), by absolute path."""
    return str(Path(sys.executable).parent / name)


def _start_postgres(stack: dict, keys: dict) -> None:
    """initdb once (superuser ``siamese_admin``, password auth on loopback), start on the port, and give each
    service its role and database (:func:`_ensure_roles`)."""
    import psutil

    root, pg = Path(stack["root"]), stack["services"]["postgres"]
    folder, data = root / "postgres", root / "postgres" / "data"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        probe = subprocess.run(_as_postgres(["test", "-w", str(folder)]), check=False)
        if probe.returncode != 0:
            raise StackError(f"PostgreSQL runs as user 'postgres', which cannot reach {folder}: "
                             "use a --root whose parent folders it can enter (mode 755)")
    if not (data / "PG_VERSION").exists():
        pwfile = folder / "pwfile"
        pwfile.write_text(keys["postgres_admin_password"] + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        done = subprocess.run(_as_postgres([pg_bin("initdb"), "-D", str(data), "-U", PG_ADMIN, f"--pwfile={pwfile}",
                                            "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8",
                                            "--locale=C"]),
                              capture_output=True, text=True, cwd=folder, check=False)
        pwfile.unlink()
        if done.returncode != 0:
            raise StackError(f"initdb failed in {data}: {(done.stderr or done.stdout).strip()[-2000:]}")
    options = f"-p {pg['port']} -c listen_addresses={HOST} -c unix_socket_directories=''"
    done = subprocess.run(_as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-l", pg["log"], "-o", options,
                                        "-w", "-t", str(STARTUP_TIMEOUT_S), "start"]),
                          capture_output=True, text=True, cwd=folder, check=False)
    if done.returncode != 0:
        raise StackError(f"pg_ctl start failed ({done.stdout.strip() or done.stderr.strip()}); "
                         f"last lines of {pg['log']}:\n{_tail(pg['log'])}")
    pg["pid"] = int((data / "postmaster.pid").read_text().split()[0])
    pg["started"] = psutil.Process(pg["pid"]).create_time()
    _ensure_roles(pg["port"], keys)
    _wait("postgres", lambda: _check_postgres(stack), {}, Path(pg["log"]), 60)


def _ensure_roles(port: int, keys: dict) -> None:
    """One login role per database (``mlflow``, ``prefect``), owner of its database and nothing else: no
    superuser, no CREATEDB or CREATEROLE, no CONNECT to the other's database. A cluster made before these
    roles (its superuser was ``mlflow``) gets the admin role and loses the superuser on ``mlflow``."""
    import psycopg2

    def connect(user: str, password: str, database: str = "postgres"):
        connection = psycopg2.connect(host=HOST, port=port, user=user, password=password, dbname=database,
                                      connect_timeout=10)
        connection.autocommit = True
        return connection

    earlier_layout = False
    try:
        admin = connect(PG_ADMIN, keys["postgres_admin_password"])
    except psycopg2.OperationalError:  # the earlier layout: make the admin role as the old superuser
        earlier_layout = True
        with closing(connect("mlflow", keys["postgres_password"])) as old, old.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {PG_ADMIN} LOGIN SUPERUSER PASSWORD %s", (keys["postgres_admin_password"],))
        admin = connect(PG_ADMIN, keys["postgres_admin_password"])
    with closing(admin), admin.cursor() as cursor:
        for role, password in (("mlflow", keys["postgres_password"]), ("prefect", keys["prefect_db_password"])):
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cursor.fetchone() else "CREATE"
            cursor.execute(f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %s", (password,))
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (role,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {role} OWNER {role}")
            cursor.execute(f"ALTER DATABASE {role} OWNER TO {role}")
            cursor.execute(f"REVOKE ALL ON DATABASE {role} FROM PUBLIC")
        cursor.execute("REVOKE ALL ON DATABASE postgres FROM PUBLIC")
    if earlier_layout:  # Prefect's tables were made as mlflow
        with closing(connect(PG_ADMIN, keys["postgres_admin_password"], "prefect")) as prefect, prefect.cursor() as cursor:
            cursor.execute("REASSIGN OWNED BY mlflow TO prefect")
            cursor.execute("ALTER DATABASE mlflow OWNER TO mlflow")  # REASSIGN moved the databases it owned too


def _s3_client(stack: dict):
    import boto3

    keys = _secrets(Path(stack["root"]))
    return boto3.client("s3", endpoint_url=stack["services"]["s3"]["url"], aws_access_key_id=keys["aws_access_key_id"],
                        aws_secret_access_key=keys["aws_secret_access_key"], region_name="us-east-1")


def _start_s3(stack: dict, env: dict) -> None:
    """moto's S3 server; the bucket is made, with the objects ``down`` saved last time."""
    root, s3 = Path(stack["root"]), stack["services"]["s3"]
    s3.update(_start([sys.executable, "-m", "pipelines.s3server", HOST, str(s3["port"])],
                     Path(s3["log"]), env, root))
    _wait("s3", lambda: _s3_answers(stack), s3, Path(s3["log"]))
    client, saved = _s3_client(stack), root / "s3" / "bucket"
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in saved.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, path.relative_to(saved).as_posix())


def _save_bucket(stack: dict) -> None:
    """Download every object of the bucket to ``s3/bucket/`` (replacing the last copy only on success)."""
    client, saved = _s3_client(stack), Path(stack["root"]) / "s3" / "bucket"
    saved.parent.mkdir(mode=0o700, exist_ok=True)
    with atomic_dir(saved) as tmp:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                target = (tmp / item["Key"]).resolve()
                if item["Key"].endswith("/") or not target.is_relative_to(tmp.resolve()):
                    continue  # a folder marker, or a key that would land outside the copy
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(BUCKET, item["Key"], str(target))


def _start_mlflow(stack: dict, keys: dict, env: dict) -> None:
    """``mlflow server`` on PostgreSQL, artifacts proxied to ``s3://<bucket>/mlartifacts``; basic auth with --auth."""
    root, ml, pg = Path(stack["root"]), stack["services"]["mlflow"], stack["services"]["postgres"]
    backend = f"postgresql+psycopg2://mlflow:{keys['postgres_password']}@{HOST}:{pg['port']}/mlflow"
    env = {**env, "MLFLOW_BACKEND_STORE_URI": backend}  # in the environment, never on a command line (ps shows those)
    command = [sys.executable, "-m", "mlflow", "server",
               "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
               "--host", HOST, "--port", str(ml["port"]), "--workers", "2"]
    if stack["auth"]:
        config = root / "mlflow" / "basic_auth.ini"
        config.parent.mkdir(mode=0o700, exist_ok=True)  # the user store holds password hashes
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{root / 'mlflow' / 'basic_auth.db'}\n"
                          "admin_username = admin\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          "auth_cache_ttl_seconds = 60\n")  # else every request pays a password hash
        env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config),
               "MLFLOW_AUTH_ADMIN_PASSWORD": keys["mlflow_admin_password"],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret_key"]}
        command += ["--app-name", "basic-auth"]
    ml.update(_start(command, Path(ml["log"]), env, root))


def _mlflow_ready(stack: dict, keys: dict) -> None:
    """Wait for the tracking server; with --auth, create the user the pipeline logs in as."""
    ml = stack["services"]["mlflow"]
    _wait("mlflow", lambda: _check_mlflow(stack), ml, Path(ml["log"]))
    if stack["auth"]:
        _ensure_pipeline_user(ml["url"], keys)


def _ensure_pipeline_user(url: str, keys: dict) -> None:
    """Create the non-admin user the pipeline logs in as (it owns what it creates)."""
    body = json.dumps({"username": PIPELINE_USER, "password": keys["mlflow_user_password"]}).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    token = base64.b64encode(f"admin:{keys['mlflow_admin_password']}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        if "already exists" not in text and "RESOURCE_ALREADY_EXISTS" not in text:
            raise StackError(f"mlflow: creating user '{PIPELINE_USER}' answered {error.code}: {text[:300]}") from None


def _prefect_env(stack: dict, env: dict) -> dict:
    root, pf = Path(stack["root"]), stack["services"]["prefect"]
    return {**env, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"{pf['url']}/api"}


def _start_prefect(stack: dict, keys: dict, env: dict) -> None:
    """A Prefect server on the PostgreSQL database ``prefect``."""
    pf, pg = stack["services"]["prefect"], stack["services"]["postgres"]
    database = f"postgresql+asyncpg://prefect:{keys['prefect_db_password']}@{HOST}:{pg['port']}/prefect"
    env = {**_prefect_env(stack, env), "PREFECT_API_DATABASE_CONNECTION_URL": database}
    if stack["auth"]:
        env["PREFECT_SERVER_API_AUTH_STRING"] = f"{PREFECT_USER}:{keys['prefect_api_password']}"
    pf.update(_start([_bin("prefect"), "server", "start", "--host", HOST, "--port", str(pf["port"])],
                     Path(pf["log"]), env, Path(stack["root"])))


def _start_worker(stack: dict, env: dict) -> None:
    """Wait for the Prefect server, create work pool ``siamese`` if missing, start a process worker on it."""
    pf, wk = stack["services"]["prefect"], stack["services"]["worker"]
    env = {**_prefect_env(stack, env), **client_env(stack)}  # the flow runs it starts use the stack too
    _wait("prefect", lambda: _check_prefect(stack), pf, Path(pf["log"]))
    status, _ = _http(f"{pf['url']}/api/work_pools/{WORK_POOL}", auth=_prefect_login(stack))
    if status != 200:
        done = subprocess.run([_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process"],
                              env=env, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-500:]
            raise StackError(f"prefect work-pool create {WORK_POOL} failed: {output}")
    if wk["user"] != getpass.getuser():  # its own Prefect home: the stack's is readable by the stack's user only
        home = Path(stack["root"]) / "worker-home"
        home.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(home, wk["user"])
        env = {**env, "PREFECT_HOME": str(home), "HOME": str(home)}
    command = [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--install-policy", "never"]
    wk.update(_start(_as_user(wk["user"], command), Path(wk["log"]), env, Path(stack["project"])))
    _wait("worker", lambda: _check_worker(stack), wk, Path(wk["log"]))


# ---------------------------------------------------------------- up, status, down


def load(root: str | os.PathLike = DEFAULT_ROOT) -> dict | None:
    """The ``stack.json`` under ``root``, or None."""
    path = Path(root) / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None


def client_env(stack: dict) -> dict[str, str]:
    """The environment variables a user exports to run the pipeline against this stack."""
    keys, services = _secrets(Path(stack["root"])), stack["services"]
    env = {"MLFLOW_TRACKING_URI": services["mlflow"]["url"], "MLFLOW_S3_ENDPOINT_URL": services["s3"]["url"],
           "AWS_ACCESS_KEY_ID": keys["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": keys["aws_secret_access_key"],
           "AWS_DEFAULT_REGION": "us-east-1", "PREFECT_API_URL": f"{services['prefect']['url']}/api"}
    if stack["auth"]:
        env.update(MLFLOW_TRACKING_USERNAME=PIPELINE_USER, MLFLOW_TRACKING_PASSWORD=keys["mlflow_user_password"],
                   PREFECT_API_AUTH_STRING=f"{PREFECT_USER}:{keys['prefect_api_password']}")
    return env


def dvc_remote_commands(stack: dict, name: str = "stack") -> list[str]:
    """The commands that point a clone's default DVC remote at the stack's bucket (in .dvc/config.local)."""
    return [f"dvc remote add --local --default --force {name} s3://{BUCKET}/dvc",
            f"dvc remote modify --local {name} endpointurl {stack['services']['s3']['url']}"]


def up(root: str | os.PathLike = DEFAULT_ROOT, auth: bool = False, base_port: int | None = BASE_PORT,
       worker: str | None = None) -> dict:
    """Start every service under ``root`` and wait until each is healthy; return what ``stack.json`` holds.

    Ports: each service's port of the last run, else ``base_port + i``, else any free port
    (``base_port=None``: any free port). ``worker``: the user the worker runs flows as, when
    root starts the stack (see :func:`worker_user`). On a failure the services already started are stopped.
    """
    reason = missing()
    if auth and not reason:
        try:
            import flask_wtf  # noqa: F401
        except ImportError:
            reason = "MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')"
    if reason:
        raise StackError(f"cannot start the stack: {reason}")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text("# siamese stack up: data, logs and secrets, never committed\n*\n")
    previous = load(root)
    if previous and previous.get("state") == "up" and any(_ours(s) for s in previous["services"].values()):
        raise StackError(f"a stack is already running under {root}: see `siamese stack status --root {root}`")
    runs_flows_as = worker_user(Path.cwd(), worker)
    keys = _secrets(root)
    ports = _pick_ports(base_port, {n: s["port"] for n, s in (previous or {}).get("services", {}).items()
                                    if s.get("port")})
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    services = {name: {"port": port, "url": f"http://{HOST}:{port}", "log": str(logs / f"{name}.log")}
                for name, port in ports.items()}
    services["postgres"].update(url=f"postgresql://{HOST}:{ports['postgres']}",
                                log=str(root / "postgres" / "postgres.log"))
    services["worker"] = {"log": str(logs / "worker.log"), "pool": WORK_POOL, "user": runs_flows_as}
    stack = {"root": str(root), "project": str(Path.cwd()), "auth": auth, "state": "starting",
             "started_at": time.time(), "services": services}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": keys["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": keys["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": services["s3"]["url"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)  # a user's earlier exports must not point the servers at another stack
    try:
        _start_postgres(stack, keys)
        _write_private(root / "stack.json", stack)
        _start_s3(stack, env)
        _write_private(root / "stack.json", stack)
        _start_mlflow(stack, keys, env)
        _start_prefect(stack, keys, env)  # the two servers start up side by side
        _write_private(root / "stack.json", stack)
        _mlflow_ready(stack, keys)
        _start_worker(stack, env)
    except BaseException:
        _write_private(root / "stack.json", stack)
        down(root)
        raise
    stack.update(state="up", up_seconds=round(time.time() - stack["started_at"], 1), env=client_env(stack))
    _write_private(root / "stack.json", stack)
    return stack


def status(root: str | os.PathLike = DEFAULT_ROOT) -> dict[str, str | None]:
    """Each service's health: None when healthy, else what is wrong."""
    stack = load(root)
    if stack is None:
        raise StackError(f"no stack under {Path(root).resolve()} (no stack.json): start one with `siamese stack up`")
    if stack.get("state") == "down":
        return {name: "stopped" for name in SERVICES}
    return {name: CHECKS[name](stack) for name in SERVICES}


def down(root: str | os.PathLike = DEFAULT_ROOT) -> list[str]:
    """Stop every service (the worker first, PostgreSQL last); the names of those that were running.

    The bucket is saved to ``s3/bucket/`` before the S3 server stops. Safe to call twice: a
    service that is not running is skipped.
    """
    root = Path(root).resolve()
    stack = load(root)
    if stack is None:
        return []
    stopped, save_error = [], None
    for name in ("worker", "prefect", "mlflow", "s3"):
        service = stack["services"].get(name, {})
        if name == "s3" and stack["state"] == "up" and _ours(service):  # a failed `up` may hold half a bucket
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                _save_bucket(stack)
            except (OSError, BotoCoreError, ClientError) as exc:  # still stop everything; the last copy stays
                save_error = f"saving the bucket to {root / 's3' / 'bucket'} failed: {type(exc).__name__}: {exc}"
        if _stop_group(service):
            stopped.append(name)
    data = root / "postgres" / "data"
    pg_ctl = pg_bin("pg_ctl")
    if pg_ctl and (data / "postmaster.pid").exists():
        done = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                              capture_output=True, text=True, cwd=root / "postgres", check=False)
        if done.returncode == 0:
            stopped.append("postgres")
        elif "PID file" not in done.stderr and "Is server running" not in done.stderr:
            raise StackError(f"pg_ctl stop failed: {done.stderr.strip()[-500:]}")
    stack["state"] = "down"
    for service in stack["services"].values():
        service.pop("pid", None)
    _write_private(root / "stack.json", stack)
    if save_error:
        raise StackError(f"stopped {', '.join(stopped)}, but {save_error}")
    return stopped


# ---------------------------------------------------------------- the `siamese stack` commands

stack_app = typer.Typer(help="Run the shared stack (PostgreSQL, S3, MLflow and Prefect servers) on this machine.",
                        no_args_is_help=True)
RootOption = Annotated[Path, typer.Option("--root", help="Folder for the stack's data, logs and stack.json.")]


def _exports(stack: dict) -> str:
    return "\n".join(f"export {key}={value}" for key, value in client_env(stack).items())


def _or_fail(action):
    try:
        return action()
    except StackError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@stack_app.command("up")
def up_command(root: RootOption = Path(DEFAULT_ROOT),
               auth: Annotated[bool, typer.Option("--auth", help="MLflow basic auth; the pipeline logs in "
                                                  "as user 'siamese'.")] = False,
               worker: Annotated[str | None, typer.Option(
                   "--worker-user", help="When root starts the stack: the user the worker runs flows as "
                   "(default: the owner of this folder; root only when named).")] = None) -> None:
    """Start the services in the background, wait until each is healthy, print the variables to export."""
    stack = _or_fail(lambda: up(root, auth=auth, worker=worker))
    typer.echo(f"stack up in {stack['up_seconds']} s under {stack['root']} (logs in {stack['root']}/logs); "
               f"the worker runs flows as user '{stack['services']['worker']['user']}'")
    for name, service in stack["services"].items():
        typer.echo(f"  {name:<9}{service.get('url', 'pool ' + WORK_POOL):<32} pid {service.get('pid')}")
    if stack["auth"]:
        typer.echo(f"MLflow basic auth: the pipeline logs in as '{PIPELINE_USER}'; user 'admin' manages users "
                   f"(passwords in {stack['root']}/secrets.json)")
    typer.echo("\n# use it from this shell (or: eval \"$(siamese stack env)\")\n" + _exports(stack))
    typer.echo("\n# point this clone's DVC remote at the bucket\n" + "\n".join(dvc_remote_commands(stack)))


@stack_app.command("status")
def status_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Check each service's health; exit status 1 if any is not healthy."""
    health = _or_fail(lambda: status(root))
    services = load(root)["services"]
    for name, problem in health.items():
        where = services[name].get("url", f"pool {WORK_POOL}")
        state = "healthy" if problem is None else "stopped" if problem == "stopped" else "DOWN"
        typer.echo(f"{name:<9}{state:<9}{where}" + (f"  ({problem})" if problem and problem != "stopped" else ""))
    if any(problem is not None for problem in health.values()):
        raise typer.Exit(1)


@stack_app.command("env")
def env_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Print the export lines for a running stack: eval "$(siamese stack env)"."""
    stack = load(root)
    if stack is None or stack.get("state") != "up":
        typer.secho(f"error: no running stack under {Path(root).resolve()}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(_exports(stack))


@stack_app.command("down")
def down_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Stop every service; the data stays under --root for the next `up`."""
    stopped = _or_fail(lambda: down(root))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
