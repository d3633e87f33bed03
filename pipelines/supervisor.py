"""A small process supervisor: background services in their own process groups, with logs and health checks.

A started process is described by a plain dict, ``{"pid": ..., "started": ...}`` (its process group id
and the leader's start time), so that it can be kept in a JSON file and stopped by a later command:
:func:`is_ours` tells whether that group still runs what was started (pids get reused). A health
check is a function that returns None when the service is healthy, else what is wrong.
"""

from __future__ import annotations

import base64
import getpass
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from pipelines.errors import StackError

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20
# MLflow's server also starts a job runner and seven Huey consumers for its GenAI jobs, which this project never
# queues; the servers it starts leave them off unless the user's environment turns them on.
MLFLOW_SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

Check = Callable[[], str | None]


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path, private: bool = True) -> dict[str, Any]:
    """Start ``command`` in the background in its own process group, output appended to ``log`` (0600, in a
    0700 folder). ``private``: the files it makes are its owner's only (umask 077).

    Returns the process as ``{"pid": ..., "started": ...}`` (the pid is also the group's id).
    """
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log.parent.chmod(0o700)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(out, 0o600)  # a log an earlier version made readable by everyone
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True, umask=0o077 if private else -1)
    finally:
        os.close(out)
    return {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}


def _members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def is_ours(process: dict[str, Any]) -> bool:
    """Whether the process group recorded in ``process`` still runs what was started there."""
    pid = process.get("pid")
    if not pid:
        return False
    try:
        leader = psutil.Process(pid)
        if leader.status() != psutil.STATUS_ZOMBIE:
            return abs(leader.create_time() - process.get("started", 0)) < 1
    except psutil.NoSuchProcess:
        pass
    return bool(_members(pid))  # leader gone, children left: the group id cannot have been reused


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is a child of this process that has ended."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(process: dict[str, Any], timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the process group, SIGKILL what is left after ``timeout`` s; False if it was not running."""
    if not is_ours(process):
        return False
    pgid = process["pid"]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            if not _members(pgid):
                return True
            time.sleep(0.2)
    _reap(pgid)
    return True


def log_tail(log: Path | str, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (or why there are none)."""
    try:
        text = Path(log).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text[-lines:])


def wait_healthy(name: str, check: Check, process: dict[str, Any], log: Path | str,
                 timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``check()`` until it passes; raise :class:`StackError` with the log's tail if the process
    exits first (``process`` without a pid: not watched) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    problem: str | None = "not checked"
    while time.monotonic() < deadline:
        problem = check()
        if problem is None:
            return
        if process.get("pid") and not is_ours(process):
            raise StackError(f"{name} exited during start-up ({problem}); last lines of {log}:\n{log_tail(log)}")
        time.sleep(0.5)
    raise StackError(f"{name} not healthy after {timeout:.0f} s ({problem}); last lines of {log}:\n{log_tail(log)}")


def bind_problem(port: int, host: str = HOST) -> str | None:
    """Why a server could not listen on ``host:port`` now (in use, not allowed), or None if it could."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of :data:`HOST` now."""
    return bind_problem(port) is None


def pick_ports(names: Iterable[str], base_port: int | None, previous: dict[str, int]) -> dict[str, int]:
    """A distinct free port per name: its port in ``previous``, else ``base_port + i``, else any free port."""
    ports: dict[str, int] = {}
    for index, name in enumerate(names):
        wanted = [previous.get(name), base_port + index if base_port else None]
        port = next((p for p in wanted if p and p not in ports.values() and port_free(p)), None)
        while port is None or port in ports.values():
            with socket.socket() as sock:
                sock.bind((HOST, 0))
                port = sock.getsockname()[1]
        ports[name] = port
    return ports


def http(url: str, auth: tuple[str, str] | None = None, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of one HTTP request, with HTTP Basic auth when ``auth`` is (user, password);
    (0, b"") when nothing answers."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
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


def as_user(user: str, command: list[str]) -> list[str]:
    """``command`` run as ``user`` when this process is root and ``user`` is another; else as it is."""
    return ["runuser", "-u", user, "--", *command] if os.geteuid() == 0 and user != getpass.getuser() else command
