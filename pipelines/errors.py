"""Errors of the pipeline layer that a user can fix; the CLI and stages report them in one line."""

from __future__ import annotations

from siamese_core.errors import USER_ERRORS


class NoChampionError(LookupError):
    """The registry has no such model, or the model has no champion (or no such alias or version) yet."""


class StackError(RuntimeError):
    """A service of the stack failed to start, stop or answer; the message is one line (plus a log tail)."""


class RegistryError(ValueError):
    """A registry request that cannot be done as asked (no reason given, already the champion)."""


class PrefectServerError(RuntimeError):
    """No Prefect server to run or schedule flows on; the message says how to start one."""


PIPELINE_USER_ERRORS = (*USER_ERRORS, NoChampionError, RegistryError, StackError, PrefectServerError)
