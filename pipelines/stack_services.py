"""The stack's services as recipes for the supervisor: PostgreSQL, the S3 server, the MLflow tracking
server, the Prefect server and the Prefect worker.

Each :class:`Recipe` starts its service in the background (``start``), waits until it answers and
sets it up (``ready``: roles, the bucket, users, the work pool), says what is wrong with it
(``check``: None when healthy; a check does what the pipeline needs of the service: a query, a write)
and stops it (``stop``). :data:`STAGES` is the order ``up`` runs them in.

Hardening: PostgreSQL's services log in as roles without privileges (the superuser is
``siamese_admin``); the S3 server answers only requests signed with the stack's key and keeps every
write in a journal (:mod:`pipelines.s3server`); with ``--auth`` MLflow and the Prefect API require
logins; when root starts the stack, PostgreSQL runs as ``postgres`` and the worker as another user.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pipelines import supervisor
from pipelines.errors import StackError
from pipelines.stack_state import BUCKET, PIPELINE_USER, REGION, WORK_POOL, Stack, client_env, prefect_login, secrets
from pipelines.supervisor import HOST, STARTUP_TIMEOUT_S

PG_ADMIN = "siamese_admin"  # PostgreSQL's superuser; the services log in as roles without privileges
_NO_BUCKET = ("404", "NoSuchBucket")
PROBES = "stack-health"  # where the health checks write, and at once delete, their probes (bucket, artifacts)


# ---------------------------------------------------------------- prerequisites


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return candidates[-1] if candidates else None


def _pg_program(name: str) -> str:
    program = pg_bin(name)
    if program is None:
        raise StackError(f"PostgreSQL's {name} not found (on PATH or in /usr/lib/postgresql/*/bin)")
    return program


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def missing(auth: bool = False) -> str | None:
    """Why the stack (with ``auth``: MLflow's basic-auth app too) cannot start on this machine, or None."""
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
    if auth:
        try:
            __import__("flask_wtf")
        except ImportError:
            return "MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')"
    return None


def worker_user(project: Path, requested: str | None) -> str:
    """Who the Prefect worker, and so every flow it runs, runs as.

    A stack started by a normal user runs it as that user. A stack started by root runs it as
    ``requested``, else as the owner of the project folder (the checkout the flows write to); it
    refuses to pick root itself: flows from the Prefect server would run with every privilege.
    """
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


def _private_folder(path: Path) -> Path:
    """``path``, made if missing, for its owner only (0700), also when an earlier version made it."""
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def _bin(name: str) -> str:
    """A console script of this environment (``prefect``), by absolute path."""
    return str(Path(sys.executable).parent / name)


def _wait(name: str, stack: Stack, check: Callable[[Stack], str | None]) -> None:
    service = stack["services"][name]
    supervisor.wait_healthy(name, lambda: check(stack), service, service["log"])


def _waiter(name: str, check: Callable[[Stack], str | None]) -> Callable[[Stack], None]:
    """A recipe's ``ready`` that only waits for ``check`` to pass."""
    return lambda stack: _wait(name, stack, check)


def _stop_process(name: str) -> Callable[[Stack], bool]:
    """A recipe's ``stop`` for a service the supervisor started: stop its process group."""
    return lambda stack: supervisor.stop(stack["services"].get(name, {}))


# ---------------------------------------------------------------- postgres


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the ``postgres`` user then."""
    return supervisor.as_user("postgres", command)


def _start_postgres(stack: Stack, env: dict[str, str]) -> None:
    """initdb once (superuser ``siamese_admin``, password auth on loopback), then start on the port."""
    root, pg, keys = Path(stack["root"]), stack["services"]["postgres"], secrets(stack["root"])
    folder, data = _private_folder(root / "postgres"), root / "postgres" / "data"
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
        done = subprocess.run(_as_postgres([_pg_program("initdb"), "-D", str(data), "-U", PG_ADMIN,
                                            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer",
                                            "-E", "UTF8", "--locale=C"]),
                              capture_output=True, text=True, cwd=folder, check=False)
        pwfile.unlink()
        if done.returncode != 0:
            raise StackError(f"initdb failed in {data}: {(done.stderr or done.stdout).strip()[-2000:]}")
    options = f"-p {pg['port']} -c listen_addresses={HOST} -c unix_socket_directories=''"
    done = subprocess.run(_as_postgres([_pg_program("pg_ctl"), "-D", str(data), "-l", pg["log"], "-o", options,
                                        "-w", "-t", str(STARTUP_TIMEOUT_S), "start"]),
                          capture_output=True, text=True, cwd=folder, check=False)
    if done.returncode != 0:
        raise StackError(f"pg_ctl start failed ({done.stdout.strip() or done.stderr.strip()}); "
                         f"last lines of {pg['log']}:\n{supervisor.log_tail(pg['log'])}")
    pg["pid"] = int((data / "postmaster.pid").read_text().split()[0])
    pg["started"] = psutil.Process(pg["pid"]).create_time()


def _postgres_ready(stack: Stack) -> None:
    """Give each service its role and database (:func:`_ensure_roles`), then wait until ``mlflow`` logs in."""
    pg = stack["services"]["postgres"]
    _ensure_roles(pg["port"], secrets(stack["root"]))
    supervisor.wait_healthy("postgres", lambda: _check_postgres(stack), {}, pg["log"], 60)


def _ensure_roles(port: int, keys: dict[str, str]) -> None:
    """One login role per database (``mlflow``, ``prefect``), owner of its database and nothing else: no
    superuser, no CREATEDB or CREATEROLE, no CONNECT to the other's database. A cluster made before these
    roles (its superuser was ``mlflow``) gets the admin role and loses the superuser on ``mlflow``."""
    import psycopg2  # lazy: the [stack] extra, installed only where the stack runs

    def connect(user: str, password: str, database: str = "postgres") -> Any:
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


def _check_postgres(stack: Stack) -> str | None:
    """PostgreSQL answers a query of the role ``mlflow`` on its database."""
    import psycopg2  # lazy: the [stack] extra, installed only where the stack runs

    port, password = stack["services"]["postgres"]["port"], secrets(stack["root"])["postgres_password"]
    try:
        with closing(psycopg2.connect(host=HOST, port=port, user="mlflow", password=password, dbname="mlflow",
                                      connect_timeout=3)) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _stop_postgres(stack: Stack) -> bool:
    """``pg_ctl stop`` (fast); False if it was not running."""
    data = Path(stack["root"]) / "postgres" / "data"
    pg_ctl = pg_bin("pg_ctl")
    if not pg_ctl or not (data / "postmaster.pid").exists():
        return False
    done = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                          capture_output=True, text=True, cwd=data.parent, check=False)
    if done.returncode == 0:
        return True
    if "PID file" not in done.stderr and "Is server running" not in done.stderr:
        raise StackError(f"pg_ctl stop failed: {done.stderr.strip()[-500:]}")
    return False


# ---------------------------------------------------------------- s3


def s3_client(stack: Stack, config: Any = None) -> Any:
    """A boto3 S3 client on the stack's S3 server, signing with the stack's key (``config``: botocore's)."""
    import boto3  # lazy: the [stack] extra, installed only where the stack runs

    keys = secrets(stack["root"])
    return boto3.client("s3", endpoint_url=stack["services"]["s3"]["url"], aws_access_key_id=keys["aws_access_key_id"],
                        aws_secret_access_key=keys["aws_secret_access_key"], region_name=REGION, config=config)


def _start_s3(stack: Stack, env: dict[str, str]) -> None:
    """The S3 server (:mod:`pipelines.s3server`), replaying its journal ``s3/journal`` as it starts."""
    root, s3 = Path(stack["root"]), stack["services"]["s3"]
    command = [sys.executable, "-m", "pipelines.s3server", HOST, str(s3["port"]),
               str(_private_folder(root / "s3") / "journal")]
    s3.update(supervisor.start(command, Path(s3["log"]), env, root))


def _s3_ready(stack: Stack) -> None:
    """Wait for the S3 server; make the bucket if it has none. A bucket that an earlier version of the
    stack saved to ``s3/bucket/`` on ``down`` is uploaded once (into the journal), then that copy is removed."""
    _wait("s3", stack, _s3_answers)
    client, saved = s3_client(stack), Path(stack["root"]) / "s3" / "bucket"
    if _bucket_problem(stack) is not None:
        client.create_bucket(Bucket=BUCKET)
    if saved.is_dir():
        for path in sorted(p for p in saved.rglob("*") if p.is_file()):
            client.upload_file(str(path), BUCKET, path.relative_to(saved).as_posix())
        shutil.rmtree(saved)


def _bucket_problem(stack: Stack) -> tuple[str, str] | None:
    """None when a HEAD of the bucket with the stack's keys succeeds, else (error code, what went wrong)."""
    import botocore.exceptions  # lazy: the [stack] extra

    try:
        s3_client(stack).head_bucket(Bucket=BUCKET)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        return code, f"bucket '{BUCKET}' answered {code}" + (" (it is gone)" if code in _NO_BUCKET else "")
    except botocore.exceptions.BotoCoreError as exc:
        return "", f"no answer ({type(exc).__name__})"
    return None


def _s3_answers(stack: Stack) -> str | None:
    """The S3 server answers the stack's keys (at start-up the bucket may not exist yet)."""
    problem = _bucket_problem(stack)
    return None if problem is None or problem[0] in _NO_BUCKET else problem[1]


def _check_s3(stack: Stack) -> str | None:
    """The bucket itself answers (a server that lost it is not healthy) and takes a write: a probe object
    put and deleted with the stack's key, without retries."""
    import botocore.exceptions  # lazy: the [stack] extra
    from botocore.config import Config  # lazy: the [stack] extra

    problem = _bucket_problem(stack)
    if problem is not None:
        return problem[1]
    client = s3_client(stack, Config(retries={"total_max_attempts": 1}, read_timeout=30))
    key = f"{PROBES}/{uuid.uuid4().hex}"
    try:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"probe")
        client.delete_object(Bucket=BUCKET, Key=key)
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        return f"cannot write to bucket '{BUCKET}': {error.get('Code', '?')} ({error.get('Message', '')})"
    except botocore.exceptions.BotoCoreError as exc:
        return f"cannot write to bucket '{BUCKET}': no answer ({type(exc).__name__})"
    return None


# ---------------------------------------------------------------- mlflow


def _start_mlflow(stack: Stack, env: dict[str, str]) -> None:
    """``mlflow server`` on PostgreSQL, artifacts proxied to ``s3://<bucket>/mlartifacts``; basic auth with --auth."""
    root, ml, pg = Path(stack["root"]), stack["services"]["mlflow"], stack["services"]["postgres"]
    keys = secrets(root)
    backend = f"postgresql+psycopg2://mlflow:{keys['postgres_password']}@{HOST}:{pg['port']}/mlflow"
    # the backend in the environment, never on a command line (ps shows those)
    env = {**supervisor.MLFLOW_SERVER_DEFAULTS, **env, "MLFLOW_BACKEND_STORE_URI": backend}
    command = [sys.executable, "-m", "mlflow", "server",
               "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
               "--host", HOST, "--port", str(ml["port"]), "--workers", "2"]
    if stack["auth"]:
        config = root / "mlflow" / "basic_auth.ini"
        _private_folder(config.parent)  # the user store holds password hashes
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{root / 'mlflow' / 'basic_auth.db'}\n"
                          "admin_username = admin\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          "auth_cache_ttl_seconds = 60\n")  # else every request pays a password hash
        env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config),
               "MLFLOW_AUTH_ADMIN_PASSWORD": keys["mlflow_admin_password"],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret_key"]}
        command += ["--app-name", "basic-auth"]
    ml.update(supervisor.start(command, Path(ml["log"]), env, root))


def _mlflow_ready(stack: Stack) -> None:
    """Wait for the tracking server; with --auth, create the non-admin user the pipeline logs in as."""
    _wait("mlflow", stack, _mlflow_answers)
    if not stack["auth"]:
        return
    keys = secrets(stack["root"])
    body = json.dumps({"username": PIPELINE_USER, "password": keys["mlflow_user_password"]}).encode()
    status, answer = supervisor.http(f"{stack['services']['mlflow']['url']}/api/2.0/mlflow/users/create",
                                     auth=("admin", keys["mlflow_admin_password"]), method="POST", body=body,
                                     headers={"Content-Type": "application/json"}, timeout=30)
    text = answer.decode(errors="replace")
    if status != 200 and "already exists" not in text and "RESOURCE_ALREADY_EXISTS" not in text:
        raise StackError(f"mlflow: creating user '{PIPELINE_USER}' answered {status or 'nothing'}: {text[:300]}")


def _mlflow_answers(stack: Stack) -> str | None:
    status, body = supervisor.http(stack["services"]["mlflow"]["url"] + "/health")
    return None if status == 200 else f"GET /health answered {status or 'nothing'} {body[:80]!r}"


def _check_mlflow(stack: Stack) -> str | None:
    """The tracking server answers a search of its store (PostgreSQL) and takes an artifact: a probe written
    and deleted through its artifact proxy (so into the bucket); as user admin with --auth."""
    problem = _mlflow_answers(stack)
    if problem:
        return problem
    api = f"{stack['services']['mlflow']['url']}/api/2.0"
    login = ("admin", secrets(stack["root"])["mlflow_admin_password"]) if stack["auth"] else None
    probe = f"{api}/mlflow-artifacts/artifacts/{PROBES}/{uuid.uuid4().hex}"
    for what, url, method, body in (("search its experiments", f"{api}/mlflow/experiments/search?max_results=1",
                                     "GET", None),
                                    ("write an artifact", probe, "PUT", b"probe"),
                                    ("delete an artifact", probe, "DELETE", None)):
        status, answer = supervisor.http(url, auth=login, method=method, body=body, timeout=60)
        if status != 200:
            return f"cannot {what}: {method} answered {status or 'nothing'} {answer[:120]!r}"
    return None


# ---------------------------------------------------------------- prefect server and worker


def _prefect_env(stack: Stack, env: dict[str, str]) -> dict[str, str]:
    root, pf = Path(stack["root"]), stack["services"]["prefect"]
    return {**env, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"{pf['url']}/api"}


def _start_prefect(stack: Stack, env: dict[str, str]) -> None:
    """A Prefect server on the PostgreSQL database ``prefect``; with --auth its API requires a login."""
    pf, pg = stack["services"]["prefect"], stack["services"]["postgres"]
    database = f"postgresql+asyncpg://prefect:{secrets(stack['root'])['prefect_db_password']}@{HOST}:{pg['port']}/prefect"
    env = {**_prefect_env(stack, env), "PREFECT_API_DATABASE_CONNECTION_URL": database}
    login = prefect_login(stack)
    if login:
        env["PREFECT_SERVER_API_AUTH_STRING"] = ":".join(login)
    _private_folder(Path(env["PREFECT_HOME"]))
    pf.update(supervisor.start([_bin("prefect"), "server", "start", "--host", HOST, "--port", str(pf["port"])],
                               Path(pf["log"]), env, Path(stack["root"])))


def _work_pool_url(stack: Stack) -> str:
    return f"{stack['services']['prefect']['url']}/api/work_pools/{WORK_POOL}"


def _check_prefect(stack: Stack) -> str | None:
    status, _ = supervisor.http(stack["services"]["prefect"]["url"] + "/api/health", auth=prefect_login(stack))
    return None if status == 200 else f"GET /api/health answered {status or 'nothing'}"


def _start_worker(stack: Stack, env: dict[str, str]) -> None:
    """Create the process work pool ``siamese`` if missing; start a worker on it, as the worker's user, in
    the project folder. The flow runs it starts get the client environment, so they use the stack too."""
    wk = stack["services"]["worker"]
    env = {**_prefect_env(stack, env), **client_env(stack)}
    status, _ = supervisor.http(_work_pool_url(stack), auth=prefect_login(stack))
    if status != 200:
        done = subprocess.run([_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process"],
                              env=env, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-500:]
            raise StackError(f"prefect work-pool create {WORK_POOL} failed: {output}")
    if wk["user"] != getpass.getuser():  # its own Prefect home: the stack's is readable by the stack's user only
        home = Path(stack["root"]) / "worker-home"
        _private_folder(home)
        shutil.chown(home, wk["user"])
        env = {**env, "PREFECT_HOME": str(home), "HOME": str(home)}
    command = [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--install-policy", "never"]
    wk.update(supervisor.start(supervisor.as_user(wk["user"], command), Path(wk["log"]), env, Path(stack["project"]),
                               private=False))  # flows write the project's files as when the user runs them


def _check_worker(stack: Stack) -> str | None:
    if not supervisor.is_ours(stack["services"]["worker"]):
        return "worker process is not running"
    status, body = supervisor.http(_work_pool_url(stack), auth=prefect_login(stack))
    if status != 200:
        return f"work pool '{WORK_POOL}' answered {status or 'nothing'}"
    pool_status = json.loads(body).get("status")
    return None if pool_status == "READY" else f"work pool '{WORK_POOL}' is {pool_status} (no worker online)"


# ---------------------------------------------------------------- the recipes


@dataclass(frozen=True)
class Recipe:
    """How the stack runs one service; each function takes the stack's state (:mod:`pipelines.stack_state`)."""

    start: Callable[[Stack, dict[str, str]], None]  # launch it in the background, in the servers' environment
    ready: Callable[[Stack], None]  # wait until it is healthy and set it up; StackError if it is not
    check: Callable[[Stack], str | None]  # None when healthy, else what is wrong
    stop: Callable[[Stack], bool]  # stop it; False if it was not running


RECIPES = {
    "postgres": Recipe(_start_postgres, _postgres_ready, _check_postgres, _stop_postgres),
    "s3": Recipe(_start_s3, _s3_ready, _check_s3, _stop_process("s3")),
    "mlflow": Recipe(_start_mlflow, _mlflow_ready, _check_mlflow, _stop_process("mlflow")),
    "prefect": Recipe(_start_prefect, _waiter("prefect", _check_prefect), _check_prefect, _stop_process("prefect")),
    "worker": Recipe(_start_worker, _waiter("worker", _check_worker), _check_worker, _stop_process("worker")),
}
STAGES = (("s3", "postgres"), ("mlflow", "prefect"), ("worker",))  # each stage: all start, then each gets ready
