"""The versions a server follows: the one its URI names, loaded through :func:`pipelines.registry.load_version`
(artifacts that differ from those registered are refused, no download left behind) and tried on the example request
before it answers anyone; with an alias, the version the alias names now (hot reload, without a failed request); and
serving ``@champion``, the live challenger of a shadow or canary rollout, this replica's tally published for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import mlflow

from .. import registry, rollout
from ..inference_log import InferenceLog, ModelIdentity, attach
from ..params import MonitoringConfig
from ..pyfunc_model import input_example
from .protocol import short

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One loaded version: the pyfunc model (kept: a gallery searched on disk reads the files it holds), the
    :class:`pipelines.pyfunc_model.SiameseBundleModel` inside it that answers, the version number (None for a local
    folder) and its inference log."""

    pyfunc: Any
    model: Any
    version: str | None
    inference_log: Any = None


class TrialFailed(Exception):
    """A loaded version failed on the example request, so it does not answer anyone."""


@dataclass(frozen=True)
class Rollout:
    """The live challenger a replica serves beside the champion: its plan, its model and this replica's tally."""

    plan: rollout.Plan
    challenger: Loaded
    tally: rollout.Tally


# The longest wait before a version that failed to load is tried again.
MAX_RETRY_S = 600


class Retries:
    """When a version that failed to load is tried again: after ``first`` seconds, then twice as long after each
    failure, up to ``MAX_RETRY_S``. Its first failure is a warning; the later ones are not repeated."""

    def __init__(self, first: float, clock=time.monotonic):
        self.first, self.clock = first, clock
        self._failed: dict[str, tuple[float, float]] = {}  # version -> (when it may be tried again, the next wait)

    def due(self, version: str) -> bool:
        failed = self._failed.get(version)
        return failed is None or self.clock() >= failed[0]

    def failed(self, version: str, what: str) -> None:
        if version not in self._failed:
            self._failed[version] = (0.0, self.first)
            log.warning("%s; trying it again in %.0f s, waiting twice as long after each failure (up to %d s)",
                        what, self.first, MAX_RETRY_S)
        wait = self._failed[version][1]
        self._failed[version] = (self.clock() + wait, min(2 * wait, MAX_RETRY_S))

    def loaded(self, version: str) -> None:
        self._failed.pop(version, None)


class Served:
    """What ``model_uri`` serves now. With an alias (``models:/NAME@champion``) a watcher thread checks every
    ``reload_seconds`` which version the alias names; when it moves (promote, rollback, the gate), the new version
    is loaded and tried beside the old one, then swapped in with one assignment. A request holds the version it
    started with, so none fails during the swap; a version that fails to load is logged once and tried again less
    and less often (:class:`Retries`), while the old one stays.

    Serving ``@champion``, the watcher also follows the ``challenger`` of a live shadow or canary rollout
    (:mod:`pipelines.rollout`): it loads it beside the champion, publishes this replica's signed tally to the registry
    and rolls the challenger back when the pooled counts of every replica say so."""

    def __init__(self, model_uri: str, monitoring: MonitoringConfig | None = None, reload_seconds: float = 5.0,
                 replica: str | None = None, code_mismatch: str = "warn"):
        self.model_uri, self.monitoring, self.code_mismatch = model_uri, monitoring, code_mismatch
        self.replica = replica or rollout.replica_id()
        self.current = self._load(self._version())
        self.rollout: Rollout | None = None
        self._published: dict | None = None
        self._retries = Retries(max(reload_seconds, 1.0))
        self._unanswered = False  # the registry did not answer the last check
        self._stop = threading.Event()
        if "@" in model_uri and reload_seconds > 0:
            threading.Thread(target=self._watch, args=(reload_seconds,), name="alias-watcher", daemon=True).start()

    @cached_property
    def signing_key(self) -> bytes | None:
        """The key this replica signs its tallies with (:func:`pipelines.rollout.signing_key`), read once."""
        key = rollout.signing_key()
        if key is None:
            log.warning("no key to sign this replica's rollout tallies (%s): they are published unverified, and "
                        "`siamese promote` takes none of them as evidence", rollout.SIGNING_KEY_VARIABLE)
        return key

    def _version(self) -> tuple[str, str] | None:
        """The (name, version) the URI names now; None for a local model folder."""
        if not self.model_uri.startswith("models:/"):
            return None
        found = registry.version_of(self.model_uri)
        return found.name, str(found.version)

    def _load(self, named: tuple[str, str] | None, alias: str | None = None, source: str = "http") -> Loaded:
        pyfunc = load_for_serving(self.model_uri if named is None else f"models:/{named[0]}/{named[1]}",
                                  self.code_mismatch)
        try:
            pyfunc.predict(input_example())  # tried before it answers anyone
        except Exception as exc:
            raise TrialFailed(f"version {None if named is None else named[1]} failed on the example request "
                              f"({short(exc)})") from exc
        settings = self.monitoring
        uri = settings.log_location() if settings is not None else None
        inference_log = None
        if settings is not None and uri is not None:
            identity = (registry.model_identity(self.model_uri) if named is None else
                        ModelIdentity(named[0], named[1], alias or self.model_uri.partition("@")[2] or None))
            inference_log = attach(pyfunc, InferenceLog(uri, settings, identity, source))
        return Loaded(pyfunc, pyfunc.unwrap_python_model(), None if named is None else named[1], inference_log)

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            self.check()

    def check(self) -> None:
        """One look at the registry: follow the champion's alias and a live challenger. A registry that does not
        answer is warned about once, until it answers again; what is loaded goes on serving."""
        try:
            self._follow_champion()
            if self.model_uri.startswith("models:/") and self.model_uri.endswith(f"@{rollout.CHAMPION}"):
                self._follow_challenger(self.model_uri[len("models:/"):].rpartition("@")[0])
        except Exception as exc:  # the registry not answering
            if not self._unanswered:
                log.warning("%s: could not check for a new version (%s); still serving version %s, and checking on",
                            self.model_uri, _first_line(exc), self.current.version)
            self._unanswered = True
            return
        if self._unanswered:
            log.warning("%s: the registry answers again", self.model_uri)
        self._unanswered = False

    def _try_load(self, named: tuple[str, str], alias: str | None = None, source: str = "http") -> Loaded | None:
        """:meth:`_load`, or None when the version failed (logged once, tried again later) or is not due again."""
        if not self._retries.due(named[1]):
            return None
        try:
            loaded = self._load(named, alias, source)
        except Exception as exc:  # its files refused, its download or load failed, or it failed the example
            if isinstance(exc, TrialFailed) and alias == rollout.CHALLENGER:  # no replica should keep trying it
                registry.roll_back(named[0], named[1], f"{exc} on replica {self.replica}", self.replica)
            self._retries.failed(named[1], f"{named[0]}: version {named[1]} could not be loaded ({_first_line(exc)}); "
                                           f"still serving version {self.current.version}")
            return None
        self._retries.loaded(named[1])
        return loaded

    def _follow_champion(self) -> None:
        named = self._version()
        if named is None or named[1] == self.current.version:
            return
        loaded = self._try_load(named)
        if loaded is None:
            return
        live = self.rollout
        if live is not None and live.plan.version == loaded.version:  # promoted: it must not shadow itself
            self._end(named[0], live)
        old, self.current = self.current, loaded
        log.warning("%s now serves version %s (was %s)", self.model_uri, loaded.version, old.version)
        if old.inference_log is not None:
            old.inference_log.close()

    def _follow_challenger(self, name: str) -> None:
        """Load, publish for and judge the live challenger of ``name``; drop it once its rollout has ended."""
        live = self.rollout
        if live is not None:
            self._publish(name, live)
        challenger = registry.alias_version(name, rollout.CHALLENGER)
        plan = rollout.live_plan(challenger)
        if plan is None or (live is not None and live.plan.version != plan.version):
            if live is not None:
                self._end(name, live)
            if plan is None:
                return
            live = None
        if live is None:
            salt = self.signing_key or b""
            loaded = self._try_load((name, plan.version), rollout.CHALLENGER,
                                    "shadow" if plan.mode == "shadow" else "http")
            if loaded is None:
                return
            self.rollout = Rollout(plan, loaded, rollout.Tally(plan, self.current.version, salt))
            log.warning("%s: version %s is live as challenger (%s%s)", name, plan.version, plan.mode,
                        f", {plan.share:.0%} of clients" if plan.mode == "canary" else "")
            return
        reason = rollout.worse_by(plan, rollout.pooled(challenger, self.signing_key))
        if reason is not None and registry.roll_back(name, plan.version, reason, self.replica):
            self._end(name, live)

    def _end(self, name: str, live: Rollout) -> None:
        """Stop serving the challenger of a rollout that has ended (promoted, rolled back or replaced)."""
        self.rollout = None
        log.warning("%s: the rollout of version %s has ended; the champion answers everything", name, live.plan.version)
        if live.challenger.inference_log is not None:
            live.challenger.inference_log.close()

    def _publish(self, name: str, live: Rollout) -> None:
        """Write this replica's tally on the challenger's version, signed, when it changed."""
        report = live.tally.published()
        if report != self._published:
            key = self.signing_key
            signed = report if key is None else rollout.sign(report, key, name, live.plan.version, self.replica)
            registry.client().set_model_version_tag(name, live.plan.version, rollout.REPLICA_PREFIX + self.replica,
                                           json.dumps(signed, sort_keys=True))
            self._published = report

    def route(self, client_key: str) -> tuple[Loaded, str, Rollout | None]:
        """Which version answers a client: the canary's share of client keys go to the challenger."""
        live = self.rollout
        if live is not None and live.plan.mode == "canary" and rollout.to_challenger(live.plan, client_key):
            return live.challenger, rollout.CHALLENGER, live
        return self.current, rollout.CHAMPION, live

    def answering(self) -> dict[str, Loaded]:
        """The versions answering now, by role: the champion (or the one version served) and a live challenger."""
        live = self.rollout
        return {rollout.CHAMPION: self.current, **({} if live is None else {rollout.CHALLENGER: live.challenger})}

    def written(self) -> int:
        """Log records written so far by the versions answering now."""
        return sum(loaded.inference_log.stats()["written"] for loaded in self.answering().values()
                   if loaded.inference_log is not None)

    def stop(self) -> None:
        """Stop following the registry, and write what the logs hold."""
        self._stop.set()
        for loaded in self.answering().values():
            if loaded.inference_log is not None:
                loaded.inference_log.close()


def _first_line(exc: BaseException) -> str:
    """An exception's first line, up to 300 characters: what a log line repeats of it."""
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]



def load_for_serving(model_uri: str, code_mismatch: str = "warn"):
    """The pyfunc model of a registered version (``models:/NAME@alias`` or ``models:/NAME/3``), its artifacts
    checked against the digest recorded at registration, its code against this process's (``code_mismatch``) and its
    download removed once loaded (:func:`pipelines.registry.load_version`), or of a local model folder."""
    if model_uri.startswith("models:/"):
        return registry.load_version(model_uri, code_mismatch)
    return mlflow.pyfunc.load_model(model_uri)


