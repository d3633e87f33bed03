"""The trial process on its own: calls answered in one child until it has grown too much, errors raised in the
caller, a child that dies reported as such, and SIGTERM ending it as an interrupt."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.trial_process import TrialProcess, TrialProcessDied


def pid_of_child(_: object) -> int:
    return os.getpid()


def unpicklable_error(_: object) -> None:
    raise ValueError(threading.Lock())  # a lock cannot cross the pipe


def die(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_noting_how_it_ended(path: str) -> None:
    """Sleep a minute, then write to ``path`` how the sleep ended."""
    try:
        time.sleep(60)
        Path(path).write_text("slept a minute")
    except KeyboardInterrupt:
        Path(path).write_text("interrupted")
        raise


def test_one_child_answers_call_after_call_until_it_has_grown_too_much():
    with TrialProcess(2**30) as trials:
        first, second = trials.call(pid_of_child, None), trials.call(pid_of_child, None)
    assert first == second != os.getpid()
    with TrialProcess(-1) as trials:  # any growth at all is too much: a fresh child each call
        assert trials.call(pid_of_child, None) != trials.call(pid_of_child, None)


def test_an_error_in_the_child_is_raised_in_the_caller_and_the_next_call_gets_a_fresh_child():
    with TrialProcess(2**30) as trials:
        before = trials.call(pid_of_child, None)
        with pytest.raises(ValueError, match="invalid literal for int"):
            trials.call(int, "twelve")
        with pytest.raises(RuntimeError, match=r"ValueError: <unlocked _thread\.lock"):
            trials.call(unpicklable_error, None)
        assert trials.call(int, "12") == 12 and trials.call(pid_of_child, None) != before


def test_a_child_killed_in_a_call_is_reported_and_replaced():
    with TrialProcess(2**30) as trials:
        with pytest.raises(TrialProcessDied, match=r"^the trial's process ended with signal SIGKILL \(the kernel "
                                                   r"sends it when memory runs out\)$"):
            trials.call(die, None)
        assert trials.call(int, "7") == 7


def test_an_interrupt_in_the_caller_stops_the_child_with_sigterm_raised_there_as_keyboardinterrupt(tmp_path):
    """The caller interrupted mid-call (as Ctrl-C does): leaving the block terminates the child at once, and the
    call running there sees KeyboardInterrupt (so a trial's run can end KILLED)."""
    ended = tmp_path / "ended.txt"
    timer = threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt), TrialProcess(2**30) as trials:
            trials.call(sleep_noting_how_it_ended, str(ended))
    finally:
        timer.cancel()
    assert ended.read_text() == "interrupted"
