"""The entry points' process set-up and their one error boundary: SIGTERM handled like Ctrl-C (so an
interrupted run unwinds and removes its temporary files), TensorFlow's start-up chatter hidden, and
expected problems turned into one line on stderr and an exit status."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import click
import typer

from siamese_core.errors import DatasetError

from .errors import PIPELINE_USER_ERRORS

T = TypeVar("T")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (as SIGINT does)."""
    signal.signal(signal.SIGTERM, _interrupt)


def quiet_libraries() -> None:
    """Turn off library output that tells a user nothing: TensorFlow's C++ start-up lines, MLflow's
    download progress bars (local copies of a few files) and its system-metrics and input-example
    notices, and a line per HTTP request of Prefect's and MLflow's clients. Called by the entry
    points (the CLI, the flows), never on import."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("httpx", "httpcore", "mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models.model"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # tf.function's "triggered tf.function retracing" warnings: the register stage calls several networks (the new
    # one, the champion, the untrained baseline) once each by design, which TensorFlow counts as retracing
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


@contextmanager
def showing_progress(*loggers: str) -> Iterator[None]:
    """Inside the block, print the INFO lines of ``loggers`` (long phases saying what they do) plainly on
    stderr; the handler goes when the block ends, so nothing holds on to this command's stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(level)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the C++ start-up lines (written before logging starts) hidden.

    Once it is imported this does nothing: standard error is not redirected again (a Dask worker's other threads
    write there while a trial starts)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401  # lazy, and the point: TensorFlow's start-up lines hidden
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def existing(path: Path, argument: str, kind: str = "path") -> Path:
    """``path``, or a user error naming the ``argument`` it was given for when it does not exist
    (``kind``: "folder" or "file" also checks it is one)."""
    if not path.exists():
        raise DatasetError(f"{argument}: {path}: does not exist")
    if kind == "folder" and not path.is_dir():
        raise DatasetError(f"{argument}: {path}: not a folder")
    if kind == "file" and not path.is_file():
        raise DatasetError(f"{argument}: {path}: not a file")
    return path


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with ``error: <message>`` on stderr and exit status ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _way_back() -> str:
    """Under ``dvc exp run`` (which sets DVC_EXP_BASELINE_REV), how to undo what its ``-S`` options wrote into
    params.yaml: they stay there after a failed run, so running the same line again fails the same way."""
    if "DVC_EXP_BASELINE_REV" not in os.environ:
        return ""
    return "; dvc exp run -S left its values in params.yaml: `git checkout params.yaml` goes back to the committed ones"


def _debugging() -> bool:
    """Whether the command line asked for full tracebacks (``siamese --debug ...``)."""
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def guarded(action: Callable[[], T], tensorflow: bool = True, check: Callable[[], object] | None = None) -> T:
    """Run a command body: the error boundary of every ``siamese`` command.

    ``check`` runs first, before TensorFlow is imported (``tensorflow``: the body needs it), so a bad
    argument is answered at once. A user error (bad input, no champion, a registry refusal) is one line
    and exit status 1 (a traceback with ``--debug``); an interrupt or SIGTERM is exit status 130, its
    outputs untouched; a closed pipe (``| head``) is not an error.
    """
    terminate_as_interrupt()
    debug = _debugging()
    try:
        if check is not None:
            check()
        if tensorflow and not debug:
            import_tensorflow_quietly()
        return action()
    except PIPELINE_USER_ERRORS as exc:
        if debug:
            raise
        fail(str(exc) + _way_back())
    except KeyboardInterrupt:
        fail("interrupted; existing outputs are untouched", 130)
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
