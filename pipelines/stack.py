"""The shared stack on one machine: ``siamese stack up | status | env | down``.

PostgreSQL (the MLflow and Prefect databases), an S3 server (moto behind a signature check),
``mlflow server`` (runs and registry in PostgreSQL, artifacts proxied to the S3 bucket) and a
Prefect server with a process worker on pool ``siamese`` run as background processes on loopback
ports. Their data, logs, ``stack.json`` (ports, pids, URLs, logs), ``secrets.json`` and ``env`` (the
export lines) live under one folder, ``.siamese-stack/`` by default, private to its owner (0700; 0711
when root starts it, so that the ``postgres`` user and the worker's user reach their own folders).
The pipeline uses the stack through environment variables only (:func:`client_env`); ``--auth`` runs
the tracking server with MLflow's basic-auth app and a pipeline user, and the Prefect API with a
login. ``up`` prints where the credentials are, never the credentials; ``env`` prints the export
lines, for ``eval``. ``status`` checks each service for real: a query on PostgreSQL, an object
written and deleted on S3, an artifact written and deleted through MLflow.

The S3 server writes every change to ``s3/journal`` before it answers and replays it when it
starts, so the bucket outlives ``down`` and a crash or ``kill -9`` of the S3 server alike.

Parts: :mod:`pipelines.supervisor` (processes, health checks), :mod:`pipelines.stack_services`
(the services' recipes), :mod:`pipelines.stack_state` (``stack.json``, secrets, environments);
this module runs the recipes in order and holds the commands.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from pipelines import supervisor
from pipelines.errors import StackError
from pipelines.process import guarded
from pipelines.stack_services import RECIPES, STAGES, missing, worker_user
from pipelines.stack_state import (
    BASE_PORT,
    DEFAULT_ROOT,
    PIPELINE_USER,
    SERVERS,
    SERVICES,
    WORK_POOL,
    Stack,
    dvc_remote_commands,
    exports,
    load,
    new_stack,
    save,
    secrets,
    server_env,
    write_env_file,
)


def up(root: str | os.PathLike = DEFAULT_ROOT, auth: bool = False, base_port: int | None = BASE_PORT,
       worker: str | None = None) -> Stack:
    """Start every service under ``root`` and wait until each is healthy; return what ``stack.json`` holds.

    Ports: each service's port of the last run, else ``base_port + i``, else any free port
    (``base_port=None``: any free port). ``worker``: the user the worker runs flows as, when
    root starts the stack (see :func:`~pipelines.stack_services.worker_user`). On a failure the
    services already started are stopped.
    """
    reason = missing(auth)
    if reason:
        raise StackError(f"cannot start the stack: {reason}")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711 if os.geteuid() == 0 else 0o700)  # as root: 'postgres' and the worker's user pass through
    (root / ".gitignore").write_text("# siamese stack up: data, logs and secrets, never committed\n*\n")
    previous = load(root)
    if previous and previous.get("state") == "up" and any(supervisor.is_ours(s) for s in previous["services"].values()):
        raise StackError(f"a stack is already running under {root}: see `siamese stack status --root {root}`")
    runs_flows_as = worker_user(Path.cwd(), worker)
    secrets(root)  # made now, before any server needs them
    earlier = {name: service["port"] for name, service in (previous or {}).get("services", {}).items()
               if service.get("port")}
    stack = new_stack(root, Path.cwd(), auth, supervisor.pick_ports(SERVERS, base_port, earlier), runs_flows_as)
    env = server_env(stack)
    try:
        for stage in STAGES:
            for name in stage:
                RECIPES[name].start(stack, env)
            save(stack)
            for name in stage:
                RECIPES[name].ready(stack)
    except BaseException:
        save(stack)
        down(root)
        raise
    stack.update(state="up", up_seconds=round(time.time() - stack["started_at"], 1),
                 env_file=str(write_env_file(stack)))
    save(stack)
    return stack


def status(root: str | os.PathLike = DEFAULT_ROOT) -> dict[str, str | None]:
    """Each service's health: None when healthy, else what is wrong."""
    stack = load(root)
    if stack is None:
        raise StackError(f"no stack under {Path(root).resolve()} (no stack.json): start one with `siamese stack up`")
    if stack.get("state") == "down":
        return dict.fromkeys(SERVICES, "stopped")
    return {name: RECIPES[name].check(stack) for name in SERVICES}


def down(root: str | os.PathLike = DEFAULT_ROOT) -> list[str]:
    """Stop every service (the worker first, PostgreSQL last); the names of those that were running.

    The data stays under ``root`` for the next ``up``. Safe to call twice: a service that is not
    running is skipped.
    """
    stack = load(Path(root).resolve())
    if stack is None:
        return []
    stopped = [name for name in reversed(SERVICES) if RECIPES[name].stop(stack)]
    stack["state"] = "down"
    for service in stack["services"].values():
        service.pop("pid", None)
    save(stack)
    return stopped


# ---------------------------------------------------------------- the `siamese stack` commands

stack_app = typer.Typer(rich_markup_mode=None, help="Run the shared stack (PostgreSQL, S3, MLflow and Prefect servers) on this machine.",
                        no_args_is_help=True)
RootOption = Annotated[Path, typer.Option("--root", help="Folder for the stack's data, logs and stack.json.")]


@stack_app.command("up")
def up_command(root: RootOption = Path(DEFAULT_ROOT),
               auth: Annotated[bool, typer.Option("--auth", help="MLflow basic auth; the pipeline logs in "
                                                  "as user 'siamese'.")] = False,
               worker: Annotated[str | None, typer.Option(
                   "--worker-user", help="When root starts the stack: the user the worker runs flows as "
                   "(default: the owner of this folder; root only when named).")] = None) -> None:
    """Start the services in the background, wait until each is healthy, say where the variables to export are."""
    stack = guarded(lambda: up(root, auth=auth, worker=worker), tensorflow=False)
    typer.echo(f"stack up in {stack['up_seconds']} s under {stack['root']} (logs in {stack['root']}/logs); "
               f"the worker runs flows as user '{stack['services']['worker']['user']}'")
    for name, service in stack["services"].items():
        typer.echo(f"  {name:<9}{service.get('url', 'pool ' + WORK_POOL):<32} pid {service.get('pid')}")
    if stack["auth"]:
        typer.echo(f"MLflow basic auth: the pipeline logs in as '{PIPELINE_USER}'; user 'admin' manages users "
                   f"(passwords in {stack['root']}/secrets.json)")
    typer.echo(f"\n# use it from this shell ({stack['env_file']} holds the credentials, readable by you only)\n"
               f". {stack['env_file']}    # or: eval \"$(siamese stack env --root {stack['root']})\"")
    typer.echo("\n# point this clone's DVC remote at the bucket\n" + "\n".join(dvc_remote_commands(stack)))


@stack_app.command("status")
def status_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Check each service's health; exit status 1 if any is not healthy."""
    health = guarded(lambda: status(root), tensorflow=False)
    services = (load(root) or {})["services"]
    for name, problem in health.items():
        where = services[name].get("url", f"pool {WORK_POOL}")
        state = "healthy" if problem is None else "stopped" if problem == "stopped" else "DOWN"
        typer.echo(f"{name:<9}{state:<9}{where}" + (f"  ({problem})" if problem and problem != "stopped" else ""))
    if any(problem is not None for problem in health.values()):
        raise typer.Exit(1)


@stack_app.command("env")
def env_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Print the export lines for a running stack, credentials included: eval "$(siamese stack env)"."""
    stack = load(root)
    if stack is None or stack.get("state") != "up":
        typer.secho(f"error: no running stack under {Path(root).resolve()}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(exports(stack))


@stack_app.command("down")
def down_command(root: RootOption = Path(DEFAULT_ROOT)) -> None:
    """Stop every service; the data stays under --root for the next `up`."""
    stopped = guarded(lambda: down(root), tensorflow=False)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
