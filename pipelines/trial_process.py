"""A study's trials in a child process: TensorFlow keeps native memory from every model a process builds, which
only the end of the process returns (docs/how-to/tuning.md, "Memory over a long study"). The child runs trial
after trial and ends itself once it has grown by ``recycle_growth`` bytes since its first trial; the next trial
starts a fresh one. Ctrl-C is the driver's alone (the child ignores SIGINT, which a terminal sends to both): the
driver stops the child with SIGTERM, raised in it as KeyboardInterrupt, so the trial's run ends KILLED.

The interrupt helpers serve both processes: Python swallows a KeyboardInterrupt that lands in a garbage-collection
callback, so :func:`noting_interrupts` notes every one and :func:`raise_if_interrupted` raises it again at the next
epoch or trial.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import psutil

from .process import quiet_libraries, terminate_as_interrupt

STOP_SECONDS = 60  # how long a child stopped by SIGTERM may take to end its trial's run before it is killed

# Set by Ctrl-C or SIGTERM in this process during a study or a trial (see noting_interrupts)
INTERRUPTED = threading.Event()


def raise_if_interrupted() -> None:
    """Raise the Ctrl-C that Python swallowed (see :func:`noting_interrupts`), at a point where it propagates."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextmanager
def noting_interrupts() -> Iterator[None]:
    """Inside the block, Ctrl-C and SIGTERM still raise KeyboardInterrupt, and are also noted in
    :data:`INTERRUPTED`: one that lands in a garbage-collection callback, which Python swallows (printing a
    traceback, here left out), is raised again at the next epoch or trial. Only the main thread handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    INTERRUPTED.clear()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    handlers = {number: handler for number, handler in handlers.items() if callable(handler)}
    unraisable_hook = sys.unraisablehook

    def note(number, frame):
        INTERRUPTED.set()
        handlers[number](number, frame)

    def unless_interrupt(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            unraisable_hook(unraisable)

    for number in handlers:
        signal.signal(number, note)
    sys.unraisablehook = unless_interrupt
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        sys.unraisablehook = unraisable_hook


class TrialProcessDied(RuntimeError):
    """The child process ended in the middle of a trial without a word (killed: by the kernel when memory ran out,
    or by a user)."""


class TrialProcess:
    """Calls ``function(argument)`` in a child process (spawned: TensorFlow does not survive a fork), started at
    the first call and again after the child ended. A ``with`` block stops the child at its end; an exception
    ending the block stops it with SIGTERM."""

    def __init__(self, recycle_growth: int):
        self.recycle_growth = recycle_growth
        self._child: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None

    def __enter__(self) -> TrialProcess:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stop(interrupt=kind is not None)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._child = context.Process(target=_serve, args=(theirs, self.recycle_growth),
                                      name="siamese trial", daemon=True)
        self._child.start()
        theirs.close()
        self._connection = ours

    def call(self, function: Callable[[Any], Any], argument: Any) -> Any:
        """``function(argument)`` in the child: its result, or its exception raised here."""
        if self._child is None:
            self._start()
        assert self._connection is not None
        self._connection.send((function, argument))
        try:
            kind, value, keeps_going = self._connection.recv()
        except EOFError:
            code = self._end()
            raise TrialProcessDied(f"the trial's process ended with {_exit_status(code)}") from None
        if not keeps_going:
            self._end()
        if kind == "error":
            raise value
        return value

    def stop(self, interrupt: bool = False) -> None:
        """End the child: asked to when idle, with SIGTERM when ``interrupt`` (it may be in a trial)."""
        if self._child is None:
            return
        if interrupt:
            self._child.terminate()
        else:
            try:
                assert self._connection is not None
                self._connection.send(None)
            except OSError:  # it had ended already
                pass
        self._end()

    def _end(self) -> int | None:
        """Wait for the child to end (killing it after STOP_SECONDS); its exit code."""
        assert self._child is not None and self._connection is not None
        self._child.join(STOP_SECONDS)
        if self._child.is_alive():
            self._child.kill()
            self._child.join()
        code = self._child.exitcode
        self._connection.close()
        self._child, self._connection = None, None
        return code


def _exit_status(code: int | None) -> str:
    """An exit code in words; a SIGKILL is what the kernel's out-of-memory killer sends."""
    if code is None or code >= 0:
        return f"exit status {code}"
    name = signal.Signals(-code).name
    return f"signal {name}" + (" (the kernel sends it when memory runs out)" if name == "SIGKILL" else "")


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives the pipe, else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError("".join(traceback.format_exception(error)))


def _serve(connection: Connection, recycle_growth: int) -> None:
    """The child: answer calls until told to stop, an error, or ``recycle_growth`` bytes of growth."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver acts on Ctrl-C and stops this process with SIGTERM
    terminate_as_interrupt()
    quiet_libraries()
    memory = psutil.Process()
    first = 0
    try:
        with noting_interrupts():
            while (job := connection.recv()) is not None:
                function, argument = job
                try:
                    result = function(argument)
                except BaseException as exc:
                    connection.send(("error", _picklable(exc), False))
                    return
                rss = memory.memory_info().rss
                first = first or rss
                keeps_going = rss - first <= recycle_growth
                connection.send(("result", result, keeps_going))
                if not keeps_going:
                    return
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # stopped by the driver, or the driver is gone
        return
