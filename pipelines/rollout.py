"""Shadow and canary rollout: a challenger on live traffic before it becomes champion.

With ``register.rollout: shadow`` or ``canary``, a version that passes the champion gate takes the alias
``challenger`` (not ``champion``) and carries its plan as version tags (``rollout.mode``, ``rollout.share``...).
Every ``siamese serve`` replica of ``models:/NAME@champion`` reads the plan from the registry and:

- **shadow**: answers from the champion and runs the challenger on a copy of each request, after answering;
- **canary**: answers a share of clients from the challenger, chosen by a hash of the client key (``X-Client-Key``,
  else the client's address) and the version, so a client always meets the same version, on every replica.

Each replica counts what both versions did (:class:`Tally`) and publishes its counts as a version tag
``rollout.replica.<replica>``; the pooled counts of all replicas decide the automatic rollback (any replica applies
it, under the gate's lock) and the evidence ``siamese promote`` asks for. Everything a replica decides from lives in
the registry, so two replicas behind a load balancer agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import RegistryError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODES = ("direct", "shadow", "canary")
PLAN_PREFIX = "rollout."
REPLICA_PREFIX = "rollout.replica."
LATENCY_SAMPLES = 2048  # per role and replica, for the p95 it publishes


@dataclass(frozen=True)
class Plan:
    """A live rollout, as the challenger's version tags record it."""

    version: str
    mode: str
    share: float
    rollback_margin: float
    rollback_min_requests: int
    promote_min_requests: int
    promote_min_agreement: float

    def tags(self) -> dict[str, str]:
        """The version tags that record this plan (state ``live``)."""
        values = {key: str(value) for key, value in asdict(self).items() if key != "version"}
        return {**{PLAN_PREFIX + key: value for key, value in values.items()}, PLAN_PREFIX + "state": "live",
                PLAN_PREFIX + "started_at": _now()}


def plan_for(register, version: str = "") -> Plan:
    """The plan of a new challenger from params' ``register`` section."""
    return Plan(version, register.rollout, register.canary_share, register.rollback_margin,
                register.rollback_min_requests, register.promote_min_requests, register.promote_min_agreement)


def live_plan(model_version) -> Plan | None:
    """The live plan recorded on ``model_version`` (an MLflow ModelVersion), or None: none, finished or rolled back."""
    if model_version is None:
        return None
    tags = model_version.tags or {}
    if tags.get(PLAN_PREFIX + "state") != "live" or tags.get(PLAN_PREFIX + "mode") not in ("shadow", "canary"):
        return None
    try:
        return Plan(str(model_version.version), tags[PLAN_PREFIX + "mode"], float(tags[PLAN_PREFIX + "share"]),
                    float(tags[PLAN_PREFIX + "rollback_margin"]), int(tags[PLAN_PREFIX + "rollback_min_requests"]),
                    int(tags[PLAN_PREFIX + "promote_min_requests"]), float(tags[PLAN_PREFIX + "promote_min_agreement"]))
    except (KeyError, ValueError):
        log.warning("version %s has rollout tags that do not make a plan; it gets no traffic", model_version.version)
        return None


def to_challenger(plan: Plan, key: str) -> bool:
    """Whether the client ``key`` is answered by the canary: the same answer for a key, on every replica."""
    digest = hashlib.sha256(f"{plan.version}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < plan.share * 2**64


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Counts:
    """What one version did on live traffic in one replica."""

    requests: int = 0
    images: int = 0
    errors: int = 0
    unknown: int = 0
    latency_ms_sum: float = 0.0
    latencies: list = field(default_factory=list)  # the last LATENCY_SAMPLES, for the p95

    def add(self, images: int, unknown: int, error: bool, latency_ms: float) -> None:
        self.requests += 1
        self.images += images
        self.unknown += unknown
        self.errors += int(error)
        self.latency_ms_sum += latency_ms
        self.latencies.append(latency_ms)
        del self.latencies[:-LATENCY_SAMPLES]

    def published(self) -> dict:
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None
        return {"requests": self.requests, "images": self.images, "errors": self.errors, "unknown": self.unknown,
                "latency_ms_sum": round(self.latency_ms_sum, 3), "p95_ms": None if p95 is None else round(p95, 2)}


class Tally:
    """One replica's counts for one challenger: each version's requests, and how often the two agreed on the images
    both answered. Thread-safe; :meth:`published` is what the replica writes to the registry."""

    def __init__(self, plan: Plan, champion_version: str | None):
        self.plan, self.champion_version = plan, champion_version
        self._lock = threading.Lock()
        self._roles = {CHAMPION: Counts(), CHALLENGER: Counts()}
        self.compared = self.agreed = self.skipped = 0

    def add(self, role: str, images: int, unknown: int, error: bool, latency_ms: float) -> None:
        with self._lock:
            self._roles[role].add(images, unknown, error, latency_ms)

    def agree(self, labels: list[str], other: list[str]) -> list[bool]:
        """Count the images two answers share a label on; returns the agreement of each image."""
        same = [a == b for a, b in zip(labels, other)]
        with self._lock:
            self.compared += len(same)
            self.agreed += sum(same)
        return same

    def skip(self) -> None:
        """A comparison not run: too many already in flight."""
        with self._lock:
            self.skipped += 1

    def published(self) -> dict:
        with self._lock:
            return {"champion_version": self.champion_version, "compared": self.compared, "agreed": self.agreed,
                    "skipped": self.skipped, **{role: counts.published() for role, counts in self._roles.items()}}


def replica_id(port: int | None = None) -> str:
    """This server's name in the registry's tags: host, port and process."""
    name = f"{socket.gethostname()}-{port or 0}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:120]


def pooled(model_version) -> dict:
    """The counts of every replica that served ``model_version`` as challenger, added up: for each role requests,
    images, errors, unknown, mean latency and the worst replica's p95; and the agreement."""
    reports = []
    for key, value in (model_version.tags or {}).items():
        if key.startswith(REPLICA_PREFIX):
            try:
                reports.append(json.loads(value))
            except ValueError:
                log.warning("version %s: tag %s is not JSON; left out", model_version.version, key)
    total: dict = {"replicas": len(reports), "compared": 0, "agreed": 0, "skipped": 0}
    for role in (CHAMPION, CHALLENGER):
        counts: dict[str, Any] = {"requests": 0, "images": 0, "errors": 0, "unknown": 0, "latency_ms_sum": 0.0,
                                  "p95_ms": None}
        for report in reports:
            mine = report.get(role, {})
            for name in ("requests", "images", "errors", "unknown", "latency_ms_sum"):
                counts[name] += mine.get(name, 0)
            if mine.get("p95_ms") is not None:
                counts["p95_ms"] = max(counts["p95_ms"] or 0.0, mine["p95_ms"])
        total[role] = {**counts, "error_rate": _rate(counts["errors"], counts["requests"]),
                       "unknown_rate": _rate(counts["unknown"], counts["images"]),
                       "mean_ms": None if not counts["requests"] else round(counts["latency_ms_sum"] / counts["requests"], 2)}
    for report in reports:
        for name in ("compared", "agreed", "skipped"):
            total[name] += report.get(name, 0)
    total["agreement"] = _rate(total["agreed"], total["compared"])
    return total


def _rate(part: float, whole: float) -> float | None:
    return None if not whole else part / whole


def worse_by(plan: Plan, counts: dict) -> str | None:
    """Why the challenger must be rolled back (its error or unknown rate over the champion's by more than the
    margin, once it has answered ``rollback_min_requests``), or None."""
    challenger, champion = counts[CHALLENGER], counts[CHAMPION]
    if challenger["requests"] < plan.rollback_min_requests:
        return None
    for rate, what in (("error_rate", "error rate"), ("unknown_rate", "unknown rate")):
        mine, theirs = challenger[rate] or 0.0, champion[rate] or 0.0
        if mine > theirs + plan.rollback_margin:
            return (f"challenger version {plan.version}'s {what} {mine:.3f} is over the champion's {theirs:.3f} by more "
                    f"than the margin {plan.rollback_margin} ({challenger['requests']} challenger requests, "
                    f"{counts['replicas']} replica(s))")
    return None


def evidence(plan: Plan, counts: dict) -> list[str]:
    """What the live evidence lacks before the challenger may be promoted (empty: enough)."""
    missing = []
    if counts[CHALLENGER]["requests"] < plan.promote_min_requests:
        missing.append(f"{counts[CHALLENGER]['requests']} challenger requests, under the {plan.promote_min_requests} "
                       "required (register.promote_min_requests)")
    if counts["compared"] and (counts["agreement"] or 0.0) < plan.promote_min_agreement:
        missing.append(f"agreement {counts['agreement']:.3f} with the champion, under the {plan.promote_min_agreement} "
                       "required (register.promote_min_agreement)")
    if not counts["compared"] and plan.promote_min_agreement > 0:
        missing.append("no image answered by both versions yet, so no agreement")
    reason = worse_by(plan, counts)
    if reason is not None:
        missing.append(reason)
    return missing


def end(mlflow_client, model_name: str, version: str, state: str, details: dict[str, str] | None = None) -> None:
    """Record on ``version`` that its rollout ended (``state``: promoted, rolled_back or replaced), with ``details``
    as further ``rollout.`` tags; no replica serves it as challenger after this."""
    for key, value in {"state": state, **(details or {})}.items():
        mlflow_client.set_model_version_tag(model_name, str(version), PLAN_PREFIX + key, value)


def roll_back(model_name: str, version: str, reason: str, by: str) -> bool:
    """End the live rollout of ``version`` (the alias ``challenger`` leaves it, its state becomes ``rolled_back``), under
    the gate's lock; False when another replica or a promote ended it first."""
    from .registry import alias_version, client, gate_lock

    with gate_lock(model_name):
        current = alias_version(model_name, CHALLENGER)
        if current is None or str(current.version) != str(version) or live_plan(current) is None:
            return False
        mlflow_client = client()
        mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
        end(mlflow_client, model_name, version, "rolled_back",
            {"rolled_back.reason": reason, "rolled_back.by": by, "rolled_back.at": _now()})
    log.warning("%s version %s rolled back: %s", model_name, version, reason)
    return True


def status(model_name: str) -> dict:
    """The champion, the challenger and its live plan, the pooled counts and what promotion still lacks."""
    from .registry import alias_version

    champion, challenger = alias_version(model_name, CHAMPION), alias_version(model_name, CHALLENGER)
    plan = live_plan(challenger)
    found: dict = {"model_name": model_name, "champion": None if champion is None else str(champion.version),
                   "challenger": None if challenger is None else str(challenger.version),
                   "mode": None if plan is None else plan.mode, "plan": None if plan is None else asdict(plan)}
    if plan is not None:
        found["counts"] = pooled(challenger)
        found["missing"] = evidence(plan, found["counts"])
    return found


def check_promotion(model_name: str, version: str, mode: str, force: bool) -> dict | None:
    """Before ``siamese promote``: in shadow or canary mode, the live evidence the challenger ``version`` has, or
    RegistryError saying what it lacks (``force``: promote anyway, recording that). Returns the evidence to record."""
    found = status(model_name)
    if mode == "direct" and found["plan"] is None:
        return None
    if found["challenger"] != str(version) or found["plan"] is None:
        missing = [f"version {version} is not the challenger of a live rollout, so it has no live-traffic evidence"]
    else:
        missing = found["missing"]
    if missing and not force:
        raise RegistryError(f"not promoted: {'; '.join(missing)}. Check with `siamese rollout status`, or promote "
                            "anyway with --force")
    return {"mode": found["mode"] or mode, "forced": bool(missing), "missing": missing, "counts": found.get("counts")}


def finish(model_name: str, version: str, evidence_found: dict | None) -> None:
    """After a promote: record the evidence on the version and end its rollout (alias ``challenger`` removed)."""
    from .registry import alias_version, client

    mlflow_client = client()
    if evidence_found is not None:
        mlflow_client.set_model_version_tag(model_name, str(version), "promote.evidence",
                                            json.dumps(evidence_found, sort_keys=True)[:4900])
    current = alias_version(model_name, CHALLENGER)
    if current is not None and str(current.version) == str(version):
        mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
        end(mlflow_client, model_name, version, "promoted")
