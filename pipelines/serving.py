"""`siamese serve`: the recogniser over HTTP, speaking MLflow's scoring protocol.

Clients of ``mlflow models serve`` need no change: ``POST /invocations`` takes the same JSON
(``dataframe_split``, ``dataframe_records``, ``inputs`` or ``instances``, with a column ``image``
of base64 image bytes) and answers ``{"predictions": [...]}``; ``GET /ping`` and ``GET /version``
answer as MLflow's do. What this server adds:

- every answer carries ``X-Request-Id`` (the client's, or a new one) and, with an inference log
  configured, is logged (:mod:`pipelines.inference_log`); ``GET /stats`` counts what was logged and dropped;
- the version is loaded through :func:`pipelines.registry.load_version`: artifacts that differ
  from those registered are refused, and the server does not start (a later version that fails to load
  is warned about once and tried again less and less often); no download is left behind;
- the body is bounded (``$SIAMESE_MAX_BODY_BYTES``): a larger one is refused from its
  ``Content-Length``, or as soon as it has read past the limit, before any of it is parsed;
- a request nested too deeply, or with huge keys, gets a short 400 that echoes at most
  ``ECHO_CHARS`` characters of what it sent; a row in the wrong form gets one line naming the row
  and the form expected; a body that is not JSON (``text/csv``, Parquet) gets a 415.

The model's own bounds (bytes and pixels per image, images per request, pixels decoded at once
across requests, time per request) are those of :mod:`pipelines.pyfunc_model`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version as package_version
from typing import Any

import mlflow
import orjson
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import rollout
from .inference_log import UNKNOWN, InferenceLog, ModelIdentity, attach
from .params import MonitoringConfig, ServingConfig
from .pyfunc_model import RequestError, ServerError, answer_records, input_example

log = logging.getLogger(__name__)

# Largest request body ($SIAMESE_MAX_BODY_BYTES overrides it): 64 images of 1 MiB, base64-encoded, with room.
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
# A refused body is read and dropped up to this many times the limit before the 413 is sent.
DRAIN_FACTOR = 4
# The most characters of a request that an error message repeats.
ECHO_CHARS = 80
INPUT_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
JSON_TYPE = "application/json"  # the one Content-Type taken (MLflow's server also reads CSV and Parquet)
RECORD = '{"image": "<base64>"}'  # a row as a record, as error messages show it
SPLIT = '{"columns": ["image"], "data": [["<base64>"], ...]}'


class BadRequest(Exception):
    """A request refused before the model sees it; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def max_body_bytes() -> int:
    """The body limit: ``$SIAMESE_MAX_BODY_BYTES`` or the default."""
    value = os.environ.get("SIAMESE_MAX_BODY_BYTES", "")
    if value and not value.isdigit():
        raise ValueError(f"SIAMESE_MAX_BODY_BYTES={_short(value)!r} is not a whole number of bytes")
    return int(value) if value else DEFAULT_MAX_BODY_BYTES


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) from its declared length or once more than ``limit`` bytes have arrived.

    A refused body is read on and dropped, up to ``DRAIN_FACTOR`` times the limit, so the client gets to
    read the 413 (closing while it still sends makes it see a broken pipe instead); nothing is kept.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drop(request.stream(), DRAIN_FACTOR * limit)
        raise BadRequest(f"request body of {int(declared)} bytes is over the limit of {limit} "
                         "(SIAMESE_MAX_BODY_BYTES); send fewer or smaller images per request", 413)
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drop(stream, DRAIN_FACTOR * limit - size)
            raise BadRequest(f"request body is over the limit of {limit} bytes (SIAMESE_MAX_BODY_BYTES); "
                             "send fewer or smaller images per request", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drop(stream, most: int) -> None:
    """Read and discard up to about ``most`` bytes of ``stream``."""
    async for chunk in stream:
        most -= len(chunk)
        if most <= 0:
            return


def parse_request(body: bytes, content_type: str | None = JSON_TYPE) -> list:
    """The ``image`` column of a JSON request in one of MLflow's input formats (its values, unchecked), or a
    one-line BadRequest: 415 for a body declared as anything but JSON, 400 naming the row and the form expected.
    A request without a Content-Type is read as JSON."""
    media_type = (content_type or JSON_TYPE).split(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise BadRequest(f"Content-Type {_short(content_type)!r} is not accepted: this server takes JSON only "
                         f"(Content-Type: {JSON_TYPE}, an object with one key of {list(INPUT_FORMATS)})", 415)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(("depth limit", "recursion limit")):
            raise BadRequest("the request JSON is nested too deeply") from None
        raise BadRequest(f"the request is not valid JSON ({_short(exc)})") from None
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in INPUT_FORMATS:
        keys = [_short(k) for k in payload][:5] if isinstance(payload, dict) else type(payload).__name__
        raise BadRequest(f"the request must be a JSON object with one key of {list(INPUT_FORMATS)}, got {keys}")
    kind, data = next(iter(payload.items()))
    if kind == "dataframe_split":
        return _split_images(data)
    if isinstance(data, dict):  # columns: {"image": [...]}
        return _column_images(kind, data)
    if not isinstance(data, list):
        raise BadRequest(f"'{kind}' is {_what(data)}; expected a list of rows or an object of columns")
    if kind == "dataframe_records" or (data and isinstance(data[0], dict)):
        return _record_images(kind, data)
    record = next((row for row, value in enumerate(data) if isinstance(value, dict)), None)
    if record is not None:
        raise BadRequest(f"row {record} of '{kind}' is a record but row 0 is {_what(data[0])}: send every row as a "
                         f"base64 string, or every row as a record like {RECORD}")
    return data  # bare base64 strings


def _what(value) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, dict):
        return "a record (an object)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return str(orjson.dumps(value), "ascii") if isinstance(value, bool) or value is None else "a number"


def _no_image_column(columns: list, where: str = "") -> BadRequest:
    shown = [_short(c) for c in columns[:5]]
    return BadRequest(f"the request needs a column 'image' of base64-encoded images, got columns {shown}{where}")


def _split_images(data) -> list:
    """The ``image`` values of a ``dataframe_split`` table: rows are lists in the order of ``columns``."""
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or not isinstance(data.get("data"), list):
        raise BadRequest(f"'dataframe_split' must be an object {SPLIT}, got {_what(data)}"
                         + (f" with keys {[_short(k) for k in data][:5]}" if isinstance(data, dict) else ""))
    columns = data["columns"]
    if "image" not in columns:
        raise _no_image_column(columns)
    column = columns.index("image")
    for row, values in enumerate(data["data"]):
        if not isinstance(values, list):
            raise BadRequest(f"row {row} of 'dataframe_split' is {_what(values)}; its rows are lists of values in "
                             "the order of 'columns'" + (" (send records as 'dataframe_records')"
                                                         if isinstance(values, dict) else ""))
        if len(values) <= column:
            raise BadRequest(f"row {row} of 'dataframe_split' has {len(values)} values; 'columns' names {len(columns)}")
    return [values[column] for values in data["data"]]


def _column_images(kind: str, data: dict) -> list:
    """The ``image`` values of a table given as columns: ``{"image": [...]}`` (or one image as a string)."""
    if "image" not in data:
        raise _no_image_column(list(data))
    images = data["image"]
    if isinstance(images, str):
        return [images]
    if not isinstance(images, list):
        raise BadRequest(f"the column 'image' of '{kind}' is {_what(images)}; expected a list of base64 strings")
    return images


def _record_images(kind: str, rows: list) -> list:
    """The ``image`` values of a table given as records: ``[{"image": ...}, ...]``."""
    for row, record in enumerate(rows):
        if not isinstance(record, dict):
            raise BadRequest(f"row {row} of '{kind}' is {_what(record)}; every row must be a record like {RECORD}")
        if "image" not in record:
            raise _no_image_column(list(record), f" in row {row}")
    return [record["image"] for record in rows]


def _error(message: str, status: int, code: str = "INVALID_PARAMETER_VALUE") -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


@dataclass(frozen=True)
class Loaded:
    """One loaded version: the pyfunc model, the version number (None for a local folder) and its inference log."""

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
                 replica: str | None = None):
        self.model_uri, self.monitoring = model_uri, monitoring
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
        from .registry import version_of

        if not self.model_uri.startswith("models:/"):
            return None
        found = version_of(self.model_uri)
        return found.name, str(found.version)

    def _load(self, named: tuple[str, str] | None, alias: str | None = None, source: str = "http") -> Loaded:
        model = load_for_serving(self.model_uri if named is None else f"models:/{named[0]}/{named[1]}")
        try:
            model.predict(input_example())  # tried before it answers anyone
        except Exception as exc:
            raise TrialFailed(f"version {None if named is None else named[1]} failed on the example request "
                              f"({_short(exc)})") from exc
        settings = self.monitoring
        uri = settings.log_location() if settings is not None else None
        inference_log = None
        if settings is not None and uri is not None:
            identity = (ModelIdentity.of(self.model_uri) if named is None else
                        ModelIdentity(named[0], named[1], alias or self.model_uri.partition("@")[2] or None))
            inference_log = attach(model, InferenceLog(uri, settings, identity, source))
        return Loaded(model, None if named is None else named[1], inference_log)

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
                rollout.roll_back(named[0], named[1], f"{exc} on replica {self.replica}", self.replica)
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
        from .registry import alias_version

        live = self.rollout
        if live is not None:
            self._publish(name, live)
        challenger = alias_version(name, rollout.CHALLENGER)
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
        if reason is not None and rollout.roll_back(name, plan.version, reason, self.replica):
            self._end(name, live)

    def _end(self, name: str, live: Rollout) -> None:
        """Stop serving the challenger of a rollout that has ended (promoted, rolled back or replaced)."""
        self.rollout = None
        log.warning("%s: the rollout of version %s has ended; the champion answers everything", name, live.plan.version)
        if live.challenger.inference_log is not None:
            live.challenger.inference_log.close()

    def _publish(self, name: str, live: Rollout) -> None:
        """Write this replica's tally on the challenger's version, signed, when it changed."""
        from .registry import client

        report = live.tally.published()
        if report != self._published:
            key = self.signing_key
            signed = report if key is None else rollout.sign(report, key, name, live.plan.version, self.replica)
            client().set_model_version_tag(name, live.plan.version, rollout.REPLICA_PREFIX + self.replica,
                                           json.dumps(signed, sort_keys=True))
            self._published = report

    def route(self, client_key: str) -> tuple[Loaded, str, Rollout | None]:
        """Which version answers a client: the canary's share of client keys go to the challenger."""
        live = self.rollout
        if live is not None and live.plan.mode == "canary" and rollout.to_challenger(live.plan, client_key):
            return live.challenger, rollout.CHALLENGER, live
        return self.current, rollout.CHAMPION, live

    def stop(self) -> None:
        self._stop.set()


def _first_line(exc: BaseException) -> str:
    """An exception's first line, up to 300 characters: what a log line repeats of it."""
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


class MicroBatcher:
    """Concurrent requests recognised in one forward pass.

    A request's base64 images join a queue. One task takes everything queued (up to ``max_batch_images``; waiting at
    most ``max_wait_ms`` for more once one request is there) and hands it to one worker thread, which decodes each
    request's images, recognises them all in one call and gives each request its own rows. While a batch runs the
    next one gathers, so a lone request waits for nothing and a busy server batches by itself. One thread hop per
    batch, not per request; a bad image fails only its own request, a failing forward pass only its batch.
    """

    def __init__(self, settings: ServingConfig | None = None):
        self.settings = settings or ServingConfig()
        self._queue: asyncio.Queue | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="recognise")
        self.counts = {"batches": 0, "requests": 0, "images": 0}  # what /stats reports

    async def recognise(self, model, images: list) -> Recognised:
        """What ``model`` (a :class:`SiameseBundleModel`) makes of one request's base64 ``images``."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run(self._queue))
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((model, images, answer))
        return await answer

    async def _run(self, waiting: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await waiting.get()]
            images = len(batch[0][1])
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while images < self.settings.max_batch_images:
                try:
                    item = waiting.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(
                        waiting.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(item)
                images += len(item[1])
            self.counts["requests"] += len(batch)
            self.counts["images"] += images
            for model in {id(item[0]): item[0] for item in batch}.values():  # a swap may leave two versions in flight
                self.counts["batches"] += 1
                group = [item for item in batch if item[0] is model]
                results = await loop.run_in_executor(self._worker, recognise_requests, model,
                                                     [item[1] for item in group])
                for (_, _, answer), result in zip(group, results):
                    if isinstance(result, Exception):
                        answer.set_exception(result)
                    else:
                        answer.set_result(result)


@dataclass(frozen=True)
class Recognised:
    """One request's answer: its image bytes, matches and query embeddings, and when its work started."""

    images: list
    matches: list
    queries: Any
    started: float


def recognise_requests(model, requests: list[list]) -> list[Recognised | Exception]:
    """Each request's :class:`Recognised`, or the exception that fails it: its own bad image (RequestError), or
    the batch's forward pass (ServerError) for every request of the batch."""
    decoded: list[Any] = []
    for images in requests:
        started = time.perf_counter()
        try:
            decoded.append((*model.decode(images), started))
        except Exception as exc:  # RequestError, or the server's own limits misconfigured (ServerError)
            decoded.append(exc)
    good = [d for d in decoded if not isinstance(d, Exception)]
    try:
        matches, queries = model.recognise([array for _, arrays, _ in good for array in arrays])
    except Exception as exc:
        return [d if isinstance(d, Exception) else exc for d in decoded]
    results: list[Recognised | Exception] = []
    start = 0
    for item in decoded:
        if isinstance(item, Exception):
            results.append(item)
            continue
        images, arrays, started = item
        results.append(Recognised(images, matches[start:start + len(arrays)], queries[start:start + len(arrays)],
                                  started))
        start += len(arrays)
    return results


# Comparisons (shadow runs, canary checks) in flight at once; beyond it a request is not compared, and counted.
MAX_COMPARISONS = 64


def build_app(served: Served, batcher: MicroBatcher | None = None, client_key_header: str | None = None) -> Starlette:
    """The ASGI app answering with what ``served`` holds (a pyfunc model of this project). Each answer carries
    ``X-Request-Id`` (the client's, or a new one) and ``X-Model-Version`` (the version that answered). In a canary
    rollout the client key picks the version: the header ``client_key_header`` that a trusted proxy sets, else the
    connection's address (a header the client picks is never read). In shadow and canary rollouts the other version
    runs on the same images after the answer is sent, for the agreement; each client key counts in the rollout's
    tally as far as the plan's ``key_cap`` allows."""
    from starlette.concurrency import run_in_threadpool

    from .inference_log import REQUEST_ID

    limit = max_body_bytes()
    batcher = batcher or MicroBatcher()
    comparing: set[asyncio.Task] = set()

    async def invocations(request: Request):
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # the worker thread runs in a copy of this context
        client_key = ((request.headers.get(client_key_header) if client_key_header else None)
                      or (request.client.host if request.client else ""))
        loaded, role, live = served.route(client_key)  # this request's version, whatever a swap does meanwhile
        response: Response
        try:
            images = parse_request(await _read_body(request, limit), request.headers.get("content-type"))
            admitted = None if live is None else live.tally.admit(client_key, len(images))
            bundle_model = loaded.model.unwrap_python_model()
            if not hasattr(bundle_model, "recognise"):  # a version registered before batching: one call each
                import pandas as pd

                answers = await run_in_threadpool(loaded.model.predict, pd.DataFrame({"image": images}))
                response = JSONResponse({"predictions": answers.to_dict(orient="records")})
            else:
                try:
                    done = await _recognised(bundle_model, images, role, live, admitted)
                except _CanaryFailed:  # the champion answers; the failure counts against the canary
                    loaded, role = served.current, rollout.CHAMPION
                    bundle_model = loaded.model.unwrap_python_model()
                    done = await _recognised(bundle_model, images, role, None, None)
                bundle_model.record(done.images, done.matches, done.queries, done.started)
                if live is not None:
                    _compare(live, role, images, done, admitted)
                response = Response(orjson.dumps({"predictions": answer_records(done.matches)}),
                                    media_type="application/json")
        except BadRequest as exc:
            response = _error(str(exc), exc.status)
        except RequestError as exc:
            response = _error(exc.message, 400)
        except ServerError as exc:
            response = _error(exc.message, 500, "INTERNAL_ERROR")
        except MlflowException as exc:  # MLflow's schema check, before the model sees the request
            response = _error(_short(str(exc.message).splitlines()[0] if exc.message else exc.error_code), 400)
        except Exception:
            log.exception("prediction failed")
            response = _error("the recogniser failed on this request; the server log has the details", 500,
                              "INTERNAL_ERROR")
        response.headers["X-Request-Id"] = request_id
        if loaded.version is not None:
            response.headers["X-Model-Version"] = loaded.version
        return response

    async def _recognised(model, images: list, role: str, live: Rollout | None,
                          admitted: rollout.Admitted | None) -> Recognised:
        """The answer of ``model``, counted in the rollout's tally as far as ``admitted`` lets it; _CanaryFailed when
        the challenger fails on it."""
        try:
            done = await batcher.recognise(model, images)
        except ServerError:
            if live is not None:
                if admitted is not None:
                    live.tally.add(role, admitted, 0, True, 0.0)
                if role == rollout.CHALLENGER:
                    raise _CanaryFailed() from None
            raise
        if live is not None and admitted is not None:
            live.tally.add(role, admitted, _unknown(done.matches[:admitted.images]), False,
                           1000 * (time.perf_counter() - done.started))
        return done

    def _compare(live: Rollout, role: str, images: list, answered: Recognised, admitted: rollout.Admitted | None) -> None:
        """Run the other version on the request's images after answering: every request in shadow mode (the
        challenger, logged as ``shadow``), the canary's requests in canary mode (the champion)."""
        other = (live.challenger if live.plan.mode == "shadow" and role == rollout.CHAMPION else
                 served.current if live.plan.mode == "canary" and role == rollout.CHALLENGER else None)
        if other is None:
            return
        if len(comparing) >= MAX_COMPARISONS:
            live.tally.skip()
            return
        shadow = live.plan.mode == "shadow"

        async def compare():
            model = other.model.unwrap_python_model()
            try:
                done = await (_recognised(model, images, rollout.CHALLENGER, live, admitted) if shadow else
                              batcher.recognise(model, images))
            except (RequestError, ServerError, _CanaryFailed):
                return  # counted by _recognised in shadow mode; a champion failing is the champion's own log's
            agreement = live.tally.agree([m.label for m in answered.matches], [m.label for m in done.matches],
                                         admitted)
            if shadow:
                model.record(done.images, done.matches, done.queries, done.started, agreement)

        task = asyncio.get_running_loop().create_task(compare())
        comparing.add(task)
        task.add_done_callback(comparing.discard)

    async def ping(request: Request):
        return PlainTextResponse("\n")

    async def version(request: Request):
        loaded = served.current
        which = "" if loaded.version is None else f", version {loaded.version}"
        live = served.rollout
        staged = "" if live is None else f"; challenger version {live.plan.version} in {live.plan.mode}"
        return PlainTextResponse(f"{served.model_uri}{which}{staged} "
                                 f"(siamese-recognizer {package_version('siamese-recognizer')})")

    async def stats(request: Request):
        loaded, live = served.current, served.rollout
        return JSONResponse({"model": served.model_uri, "version": loaded.version, "batching": batcher.counts,
                             "replica": served.replica,
                             "rollout": None if live is None else {"version": live.plan.version, "mode": live.plan.mode,
                                                                   **live.tally.published()},
                             "inference_log": None if loaded.inference_log is None else
                             {"uri": loaded.inference_log.uri, **loaded.inference_log.stats()}})

    return Starlette(routes=[
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ])


class _CanaryFailed(Exception):
    """The challenger failed on a request it was to answer (counted); the champion answers instead."""


def _unknown(matches: list) -> int:
    return sum(m.label == UNKNOWN for m in matches)


def load_for_serving(model_uri: str):
    """The pyfunc model of a registered version (``models:/NAME@alias`` or ``models:/NAME/3``), its artifacts
    checked against the digest recorded at registration and its download removed once loaded
    (:func:`pipelines.registry.load_version`), or of a local model folder."""
    from .registry import load_version

    return load_version(model_uri) if model_uri.startswith("models:/") else mlflow.pyfunc.load_model(model_uri)


def _return_large_blocks_to_the_system() -> None:
    """Have glibc's malloc map every block of 1 MiB or more on its own, so a decoded image's memory goes back
    to the system when it is freed. By default the threshold rises after such a free, and later images
    land in per-thread heaps that keep their size (the server kept 360 MiB after six near-limit requests)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def set_threads(settings: ServingConfig) -> None:
    """Threads for this machine, set before TensorFlow runs anything: the forward pass uses ``tf_threads`` (0: every
    core), and BLAS one thread (the gallery search is one small matrix product per batch; more threads only
    contend with TensorFlow's)."""
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cores = settings.tf_threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already ran an op in this process (a test's): its threads stay
        pass


def serve(model_uri: str, host: str, port: int, monitoring: MonitoringConfig | None = None,
          reload_seconds: float = 5.0, batching: ServingConfig | None = None) -> None:
    """Load the model, then serve it until interrupted, logging its answers as ``monitoring`` says (None: no log)
    and following its alias every ``reload_seconds`` (0: never)."""
    import uvicorn

    _return_large_blocks_to_the_system()

    from .pyfunc_model import SERVER_TIMEOUT_VARIABLE

    os.environ.setdefault(SERVER_TIMEOUT_VARIABLE, "60")  # the time limit per request, as mlflow models serve's
    settings = batching or ServingConfig()
    set_threads(settings)
    served = Served(model_uri, monitoring, reload_seconds, rollout.replica_id(port))
    if served.current.inference_log is not None:
        log.warning("logging every answer to %s", served.current.inference_log.uri)
    try:
        # httptools' C parser and uvloop: a third of a request's CPU went to the pure-Python parser
        uvicorn.run(build_app(served, MicroBatcher(settings), settings.client_key_header), host=host, port=port,
                    log_level="warning", access_log=False, http="httptools", loop="uvloop")
    finally:
        served.stop()
