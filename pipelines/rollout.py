"""Shadow and canary rollout, its rules: a challenger on live traffic before it becomes champion.

Pure rules and counts, no registry call: :mod:`pipelines.registry` reads and writes the plans, tallies and aliases
(``roll_back``, ``rollout_status``, ``check_promotion``) and calls these.

With ``register.rollout: shadow`` or ``canary``, a version that passes the champion gate takes the alias
``challenger`` (not ``champion``) and carries its plan as version tags (``rollout.mode``, ``rollout.share``...).
Every ``siamese serve`` replica of ``models:/NAME@champion`` reads the plan from the registry and:

- **shadow**: answers from the champion and runs the challenger on a copy of each request, after answering;
- **canary**: answers a share of clients from the challenger, chosen by a hash of the client key and the version, so
  a client always meets the same version, on every replica. The key is the connection's address, or the header a
  trusted proxy sets (``serving.client_key_header``): never a header the client picks.

Each replica counts what both versions did (:class:`Tally`): every client key adds at most ``key_cap`` requests and
images, so no one client makes the evidence or the rollback. It publishes its counts, signed with the stack's key
(:func:`signing_key`), as a version tag ``rollout.replica.<replica>``; the pooled counts of the replicas whose
signature holds decide the automatic rollback (any replica applies it, under the gate's lock) and the evidence
``siamese promote`` asks for. Everything a replica decides from lives in the registry, so two replicas behind a load
balancer agree.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import RegistryError
from .gate import CHALLENGER, CHAMPION
from .tracking import tracking_uri

log = logging.getLogger(__name__)

MODES = ("direct", "shadow", "canary")
PLAN_PREFIX = "rollout."
REPLICA_PREFIX = "rollout.replica."
LATENCY_SAMPLES = 2048  # per role and replica, for the p95 it publishes
# A plan recorded before these rules existed gets these (the defaults of register.evidence_key_cap, promote_min_keys).
KEY_CAP, MIN_KEYS = 10, 20
KEY_SAMPLE = 128  # the smallest key digests a replica publishes per role: distinct keys counted across replicas
MAX_KEYS = 100_000  # client keys one replica's tally follows; a request from a key beyond them is not counted
SIGNING_KEY_VARIABLE = "SIAMESE_ROLLOUT_KEY"
UNVERIFIED_NAMED = 20  # replicas named among those whose tally is left out


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
    key_cap: int = KEY_CAP
    promote_min_keys: int = MIN_KEYS

    def tags(self) -> dict[str, str]:
        """The version tags that record this plan (state ``live``)."""
        values = {key: str(value) for key, value in asdict(self).items() if key != "version"}
        return {**{PLAN_PREFIX + key: value for key, value in values.items()}, PLAN_PREFIX + "state": "live",
                PLAN_PREFIX + "started_at": now()}


def plan_for(register, version: str = "") -> Plan:
    """The plan of a new challenger from params' ``register`` section."""
    return Plan(version, register.rollout, register.canary_share, register.rollback_margin,
                register.rollback_min_requests, register.promote_min_requests, register.promote_min_agreement,
                register.evidence_key_cap, register.promote_min_keys)


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
                    int(tags[PLAN_PREFIX + "promote_min_requests"]), float(tags[PLAN_PREFIX + "promote_min_agreement"]),
                    int(tags.get(PLAN_PREFIX + "key_cap", KEY_CAP)),
                    int(tags.get(PLAN_PREFIX + "promote_min_keys", MIN_KEYS)))
    except (KeyError, ValueError):
        log.warning("version %s has rollout tags that do not make a plan; it gets no traffic", model_version.version)
        return None


def to_challenger(plan: Plan, key: str) -> bool:
    """Whether the client ``key`` is answered by the canary: the same answer for a key, on every replica."""
    digest = hashlib.sha256(f"{plan.version}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < plan.share * 2**64


def now() -> str:
    """Now, as the rollout tags record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Admitted:
    """A request that counts in a tally: its client key's digest and how many of its images count (the first ones)."""

    key: str
    images: int


@dataclass
class Counts:
    """What one version did on live traffic in one replica."""

    requests: int = 0
    images: int = 0
    errors: int = 0
    unknown: int = 0
    latency_ms_sum: float = 0.0
    latencies: list = field(default_factory=list)  # the last LATENCY_SAMPLES, for the p95
    keys: set = field(default_factory=set)  # digests of the client keys counted

    def add(self, admitted: Admitted, unknown: int, error: bool, latency_ms: float) -> None:
        self.requests += 1
        self.images += admitted.images
        self.unknown += unknown
        self.errors += int(error)
        self.latency_ms_sum += latency_ms
        self.latencies.append(latency_ms)
        del self.latencies[:-LATENCY_SAMPLES]
        self.keys.add(admitted.key)

    def published(self) -> dict:
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None
        return {"requests": self.requests, "images": self.images, "errors": self.errors, "unknown": self.unknown,
                "latency_ms_sum": round(self.latency_ms_sum, 3), "p95_ms": None if p95 is None else round(p95, 2),
                "keys": len(self.keys), "key_sample": heapq.nsmallest(KEY_SAMPLE, self.keys)}


class Tally:
    """One replica's counts for one challenger: each version's requests, and how often the two agreed on the images
    both answered. A request counts only as far as its client key has room: each key adds at most the plan's
    ``key_cap`` requests and images (:meth:`admit`). Thread-safe; :meth:`published` is what the replica writes to the
    registry. ``salt`` keys the digests of client keys, so the registry holds no address a reader could recover."""

    def __init__(self, plan: Plan, champion_version: str | None, salt: bytes = b""):
        self.plan, self.champion_version, self.salt = plan, champion_version, salt
        self._lock = threading.Lock()
        self._roles = {CHAMPION: Counts(), CHALLENGER: Counts()}
        self._used: dict[str, list[int]] = {}  # key digest -> [requests, images] counted
        self.compared = self.agreed = self.skipped = self.capped = 0

    def admit(self, client_key: str, images: int) -> Admitted | None:
        """How much of a request of ``images`` images from ``client_key`` counts; None once the key has given the
        plan's ``key_cap`` requests or images (or is beyond the ``MAX_KEYS`` keys followed)."""
        digest = hmac.new(self.salt, f"{self.plan.version}\0{client_key}".encode(), hashlib.sha256).hexdigest()[:16]
        cap = self.plan.key_cap
        with self._lock:
            used = self._used.get(digest)
            if used is None and len(self._used) < MAX_KEYS:
                used = self._used[digest] = [0, 0]
            if used is None or used[0] >= cap or used[1] >= cap:
                self.capped += 1
                return None
            counted = min(images, cap - used[1])
            used[0] += 1
            used[1] += counted
        return Admitted(digest, counted)

    def add(self, role: str, admitted: Admitted, unknown: int, error: bool, latency_ms: float) -> None:
        with self._lock:
            self._roles[role].add(admitted, unknown, error, latency_ms)

    def agree(self, labels: list[str], other: list[str], admitted: Admitted | None) -> list[bool]:
        """The agreement of each image two answers share; the tally counts the images ``admitted`` lets count."""
        same = [a == b for a, b in zip(labels, other)]
        counted = same[:admitted.images] if admitted is not None else []
        with self._lock:
            self.compared += len(counted)
            self.agreed += sum(counted)
        return same

    def skip(self) -> None:
        """A comparison not run: too many already in flight."""
        with self._lock:
            self.skipped += 1

    def published(self) -> dict:
        with self._lock:
            return {"champion_version": self.champion_version, "compared": self.compared, "agreed": self.agreed,
                    "skipped": self.skipped, "capped": self.capped,
                    **{role: counts.published() for role, counts in self._roles.items()}}


def replica_id(port: int | None = None) -> str:
    """This server's name in the registry's tags: host, port and process."""
    name = f"{socket.gethostname()}-{port or 0}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:120]


def _mac(report: dict, key: bytes, model_name: str, version: str, replica: str) -> str:
    """HMAC-SHA256 of a tally and where it is published (model, version, replica), so it cannot be moved."""
    unsigned = {name: value for name, value in report.items() if name != "signature"}
    message = json.dumps([model_name, str(version), replica, unsigned], sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign(report: dict, key: bytes, model_name: str, version: str, replica: str) -> dict:
    """``report`` with its ``signature``: what replica ``replica`` publishes on ``version`` of ``model_name``."""
    return {**report, "signature": _mac(report, key, model_name, version, replica)}


def is_signed(report: dict, key: bytes | None, model_name: str, version: str, replica: str) -> bool:
    """Whether ``report`` carries a valid signature with ``key`` for that place (never without a key)."""
    signature = report.get("signature")
    return bool(key) and isinstance(signature, str) and hmac.compare_digest(
        signature, _mac(report, key or b"", model_name, version, replica))


def pooled(model_version, key: bytes | None) -> dict:
    """The counts of every replica that served ``model_version`` as challenger and signed them with ``key``, added up:
    for each role requests, images, errors, unknown, distinct client keys, mean latency and the worst replica's p95;
    and the agreement. ``unverified`` names (the first ``UNVERIFIED_NAMED``) replicas whose tally has no valid
    signature: left out."""
    reports, unverified = [], []
    for tag, value in (model_version.tags or {}).items():
        if not tag.startswith(REPLICA_PREFIX):
            continue
        replica = tag[len(REPLICA_PREFIX):]
        try:
            report = json.loads(value)
        except ValueError:
            report = None
        if isinstance(report, dict) and is_signed(report, key, model_version.name, model_version.version, replica):
            reports.append(report)
        else:
            unverified.append(replica)
    total: dict = {"replicas": len(reports), "unverified": sorted(unverified)[:UNVERIFIED_NAMED], "compared": 0,
                   "agreed": 0, "skipped": 0, "capped": 0}
    for role in (CHAMPION, CHALLENGER):
        counts: dict[str, Any] = {"requests": 0, "images": 0, "errors": 0, "unknown": 0, "latency_ms_sum": 0.0,
                                  "p95_ms": None}
        sample: set = set()
        most = 0
        for report in reports:
            mine = report.get(role, {})
            for name in ("requests", "images", "errors", "unknown", "latency_ms_sum"):
                counts[name] += mine.get(name, 0)
            if mine.get("p95_ms") is not None:
                counts["p95_ms"] = max(counts["p95_ms"] or 0.0, mine["p95_ms"])
            sample.update(mine.get("key_sample", []))
            most = max(most, mine.get("keys", 0))
        total[role] = {**counts, "keys": max(len(sample), most),  # at least this many: a key may reach two replicas
                       "error_rate": _rate(counts["errors"], counts["requests"]),
                       "unknown_rate": _rate(counts["unknown"], counts["images"]),
                       "mean_ms": None if not counts["requests"] else round(counts["latency_ms_sum"] / counts["requests"], 2)}
    for report in reports:
        for name in ("compared", "agreed", "skipped", "capped"):
            total[name] += report.get(name, 0)
    total["agreement"] = _rate(total["agreed"], total["compared"])
    return total


def _rate(part: float, whole: float) -> float | None:
    return None if not whole else part / whole


def worse_by(plan: Plan, counts: dict) -> str | None:
    """Why the challenger must be rolled back (its error or unknown rate over the champion's by more than the
    margin, once it has answered ``rollback_min_requests`` counted requests), or None."""
    challenger, champion = counts[CHALLENGER], counts[CHAMPION]
    if challenger["requests"] < plan.rollback_min_requests:
        return None
    for rate, what in (("error_rate", "error rate"), ("unknown_rate", "unknown rate")):
        mine, theirs = challenger[rate] or 0.0, champion[rate] or 0.0
        if mine > theirs + plan.rollback_margin:
            return (f"challenger version {plan.version}'s {what} {mine:.3f} is over the champion's {theirs:.3f} by more "
                    f"than the margin {plan.rollback_margin} ({challenger['requests']} challenger requests from "
                    f"{challenger['keys']} client keys, {counts['replicas']} replica(s))")
    return None


def evidence(plan: Plan, counts: dict) -> list[str]:
    """What the live evidence lacks before the challenger may be promoted (empty: enough)."""
    missing = []
    challenger = counts[CHALLENGER]
    if challenger["requests"] < plan.promote_min_requests:
        missing.append(f"{challenger['requests']} challenger requests, under the {plan.promote_min_requests} "
                       f"required (register.promote_min_requests; each client key counts for {plan.key_cap} at most)")
    if challenger["keys"] < plan.promote_min_keys:
        missing.append(f"{challenger['keys']} distinct client keys answered by the challenger, under the "
                       f"{plan.promote_min_keys} required (register.promote_min_keys)")
    if counts["compared"] and (counts["agreement"] or 0.0) < plan.promote_min_agreement:
        missing.append(f"agreement {counts['agreement']:.3f} with the champion, under the {plan.promote_min_agreement} "
                       "required (register.promote_min_agreement)")
    if not counts["compared"] and plan.promote_min_agreement > 0:
        missing.append("no image answered by both versions yet, so no agreement")
    reason = worse_by(plan, counts)
    if reason is not None:
        missing.append(reason)
    return missing


def signing_key() -> bytes | None:
    """The key replicas sign their tallies with and readers check them with: ``$SIAMESE_ROLLOUT_KEY`` (the stack's
    environment sets it); else, with the embedded SQLite store, a random key kept beside it (``<store>.rollout.key``,
    made on first use, readable by its owner only: whoever can write that store can read it). None with another store
    and no variable: every tally is then unverified, and none is evidence."""
    value = os.environ.get(SIGNING_KEY_VARIABLE, "")
    if value:
        return value.encode()
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):]).with_suffix(".rollout.key")
    if not path.exists():
        fd, made = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(made, path)  # the first replica's key wins; the others read it
        except FileExistsError:
            pass
        finally:
            os.unlink(made)
    found = path.stat()
    if found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise RegistryError(f"{path}: the key that signs rollout tallies must be yours and readable by you only "
                            f"(chmod 600 {path}), or anyone who reads it can forge live evidence")
    return path.read_bytes().strip()
