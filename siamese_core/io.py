"""Atomic writes: a crash never leaves half a file or half a bundle, and a write that fails
(read-only folder, full disk) is one OutputError naming the path, with the old file intact."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What a failed write looks like: no space or quota, a read-only file system, no permission.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


@contextmanager
def _write_errors_named(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        full = "No space left" in str(exc)  # some libraries' OSErrors carry no errno
        if exc.errno not in WRITE_ERRNOS and not full:
            raise
        cause = exc.strerror or ("No space left on device" if full else str(exc).splitlines()[0])
        raise OutputError(f"{path}: cannot write it ({cause}); nothing was replaced, "
                          "free space or choose another place") from exc


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM received in the block take effect when it ends (Python runs signal handlers in the
    main thread only, so elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in received:
            signal.raise_signal(number)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    with _write_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should read like any new file
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    with _write_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            with interrupts_deferred():  # the swap takes three steps: a signal between them would leave two
                old = None
                if path.exists():
                    old = path.with_name(f".{path.name}.old-{os.getpid()}")
                    os.replace(path, old)
                os.replace(tmp, path)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable(folder: str | os.PathLike, what: str = "outputs") -> Path:
    """Create ``folder`` if needed and check a file can be written in it, before any long work starts.

    Raises OutputError naming the folder and the cause (read-only, no permission, full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write {what} here ({exc.strerror or exc})") from exc
    return folder
