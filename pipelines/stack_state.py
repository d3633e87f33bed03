"""The stack's state and secrets: ``stack.json`` and ``secrets.json`` under its root folder, and the
environments built from them.

``stack.json`` holds ``root``, ``project`` (the folder the worker runs flows in), ``auth``,
``state`` (starting, up, down), ``started_at``, ``env_file`` and ``services``: per service its
``port``, ``url``, ``log`` and, while it runs, the supervisor's ``pid`` and ``started``; the worker
has ``pool`` and ``user`` instead of a port. ``env`` holds the client environment as export lines.
All three files are readable by their owner only.
"""

from __future__ import annotations

import json
import os
import secrets as tokens
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.supervisor import HOST
from siamese_core.io import atomic_path

DEFAULT_ROOT = ".siamese-stack"
BASE_PORT = 54320  # postgres 54320, s3 54321, mlflow 54322, prefect 54323, where free
SERVERS = ("postgres", "s3", "mlflow", "prefect")  # the services with a port
SERVICES = (*SERVERS, "worker")
BUCKET = "siamese"
WORK_POOL = "siamese"
PIPELINE_USER = "siamese"  # MLflow's login for the pipeline with --auth
PREFECT_USER = "siamese"  # the Prefect API's basic-auth login with --auth
REGION = "us-east-1"
_SECRET_NAMES = ("postgres_admin_password", "postgres_password", "prefect_db_password", "aws_secret_access_key",
                 "mlflow_admin_password", "mlflow_user_password", "prefect_api_password", "flask_secret_key",
                 "rollout_key")
_CLIENT_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_DEFAULT_REGION", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "PREFECT_API_AUTH_STRING", "SIAMESE_ROLLOUT_KEY")  # every variable client_env may set

Stack = dict[str, Any]


def _write_private(path: Path, text: str) -> None:
    """``text`` readable by this user only (it holds passwords), replaced atomically."""
    with atomic_path(path) as tmp:
        tmp.chmod(0o600)
        tmp.write_text(text)


def secrets(root: Path | str) -> dict[str, str]:
    """The stack's passwords and keys, made once and kept in ``secrets.json``."""
    path = Path(root) / "secrets.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    made = {"aws_access_key_id": "siamese-stack", **{name: tokens.token_urlsafe(24) for name in _SECRET_NAMES},
            **kept}
    if made != kept:  # a new stack, or one made before a key was added
        _write_private(path, json.dumps(made, indent=2))
    return made


def load(root: str | os.PathLike = DEFAULT_ROOT) -> Stack | None:
    """The ``stack.json`` under ``root``, or None."""
    path = Path(root) / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None


def save(stack: Stack) -> None:
    """Write ``stack`` to its ``stack.json``."""
    _write_private(Path(stack["root"]) / "stack.json", json.dumps(stack, indent=2))


def new_stack(root: Path, project: Path, auth: bool, ports: dict[str, int], worker_user: str) -> Stack:
    """The state of a stack about to start: each server's port, URL and log, the worker's pool and user."""
    logs = root / "logs"
    services: dict[str, dict[str, Any]] = {
        name: {"port": port, "url": f"http://{HOST}:{port}", "log": str(logs / f"{name}.log")}
        for name, port in ports.items()}
    services["postgres"].update(url=f"postgresql://{HOST}:{ports['postgres']}",
                                log=str(root / "postgres" / "postgres.log"))
    services["worker"] = {"log": str(logs / "worker.log"), "pool": WORK_POOL, "user": worker_user}
    return {"root": str(root), "project": str(project), "auth": auth, "state": "starting", "started_at": time.time(),
            "services": services}


def client_env(stack: Stack) -> dict[str, str]:
    """The environment variables a user exports to run the pipeline against this stack."""
    keys, services = secrets(stack["root"]), stack["services"]
    env = {"MLFLOW_TRACKING_URI": services["mlflow"]["url"], "MLFLOW_S3_ENDPOINT_URL": services["s3"]["url"],
           "AWS_ACCESS_KEY_ID": keys["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": keys["aws_secret_access_key"],
           "AWS_DEFAULT_REGION": REGION, "PREFECT_API_URL": f"{services['prefect']['url']}/api",
           "SIAMESE_ROLLOUT_KEY": keys["rollout_key"]}  # signs serving replicas' rollout tallies
    if stack["auth"]:
        env.update(MLFLOW_TRACKING_USERNAME=PIPELINE_USER, MLFLOW_TRACKING_PASSWORD=keys["mlflow_user_password"],
                   PREFECT_API_AUTH_STRING=":".join(prefect_login(stack) or ()))
    return env


def exports(stack: Stack) -> str:
    """The client environment as shell ``export`` lines (they hold the stack's credentials)."""
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in client_env(stack).items())


def write_env_file(stack: Stack) -> Path:
    """Write :func:`exports` to ``<root>/env``, readable by this user only; its path."""
    path = Path(stack["root"]) / "env"
    _write_private(path, exports(stack) + "\n")
    return path


def server_env(stack: Stack) -> dict[str, str]:
    """The environment the servers run in: this one, with the bucket's endpoint and keys from
    :func:`client_env`, without a user's earlier exports that would point a server at another stack,
    and with this Python's scripts first on PATH."""
    client = client_env(stack)
    env = {name: value for name, value in os.environ.items() if name not in _CLIENT_VARIABLES}
    env.update({name: client[name] for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def prefect_login(stack: Stack) -> tuple[str, str] | None:
    """The Prefect API's basic-auth (user, password) with --auth, else None."""
    return (PREFECT_USER, secrets(stack["root"])["prefect_api_password"]) if stack["auth"] else None


def dvc_remote_commands(stack: Stack, name: str = "stack") -> list[str]:
    """The commands that point a clone's default DVC remote at the stack's bucket (in .dvc/config.local)."""
    return [f"dvc remote add --local --default --force {name} s3://{BUCKET}/dvc",
            f"dvc remote modify --local {name} endpointurl {stack['services']['s3']['url']}"]
