"""Process set-up for the entry points (CLI, stages): SIGTERM handled like Ctrl-C, so an
interrupted run unwinds and removes its temporary files; TensorFlow's start-up chatter hidden."""

from __future__ import annotations

import os
import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (as SIGINT does)."""
    signal.signal(signal.SIGTERM, _interrupt)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the C++ start-up lines (written before logging starts) hidden."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
