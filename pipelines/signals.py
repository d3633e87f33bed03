"""SIGTERM handled like Ctrl-C, so an interrupted run unwinds and removes its temporary files."""

from __future__ import annotations

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (as SIGINT does)."""
    signal.signal(signal.SIGTERM, _interrupt)
