"""`siamese serve`: the recogniser over HTTP, speaking MLflow's scoring protocol.

Clients of ``mlflow models serve`` need no change: ``POST /invocations`` takes the same JSON
(``dataframe_split``, ``dataframe_records``, ``inputs`` or ``instances``, with a column ``image``
of base64 image bytes) and answers ``{"predictions": [...]}``; ``GET /ping`` and ``GET /version``
answer as MLflow's do. What this server adds:

- every answer carries ``X-Request-Id`` (the client's, or a new one) and, with an inference log
  configured, is logged (:mod:`pipelines.inference_log`); ``GET /stats`` counts what was logged and dropped;
- the version is loaded through :func:`pipelines.registry.verified_download`: artifacts that differ
  from those registered are refused, and the server does not start;
- the body is bounded (``$SIAMESE_MAX_BODY_BYTES``): a larger one is refused from its
  ``Content-Length``, or as soon as it has read past the limit, before any of it is parsed;
- a request nested too deeply, or with huge keys, gets a short 400 that echoes at most
  ``ECHO_CHARS`` characters of what it sent.

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


def parse_request(body: bytes) -> list:
    """The ``image`` column of a request in one of MLflow's input formats (its values, unchecked), or BadRequest."""
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
    try:
        if kind == "dataframe_split":
            columns = list(data["columns"])
            if "image" not in columns:
                raise _NoImageColumn(columns)
            column = columns.index("image")
            return [row[column] for row in data["data"]]
        if isinstance(data, dict):  # inputs / instances as columns
            if "image" not in data:
                raise _NoImageColumn(list(data))
            return [data["image"]] if isinstance(data["image"], str) else list(data["image"])
        if not isinstance(data, list):
            raise TypeError(f"expected a list of rows, got {type(data).__name__}")
        if kind == "dataframe_records" or (data and isinstance(data[0], dict)):  # rows as records
            missing = next((row for row in data if not isinstance(row, dict) or "image" not in row), None)
            if missing is not None:
                raise _NoImageColumn(list(missing) if isinstance(missing, dict) else [])
            return [row["image"] for row in data]
        return data  # inputs / instances as bare base64 strings
    except _NoImageColumn as exc:
        columns = [_short(c) for c in exc.args[0][:5]]
        raise BadRequest(f"the request needs a column 'image' of base64-encoded images, got columns {columns}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BadRequest(f"'{kind}' is not a table of images ({_short(exc)})") from None


class _NoImageColumn(Exception):
    """A request table without the column ``image``; its argument is the columns it has."""


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


class Served:
    """What ``model_uri`` serves now. With an alias (``models:/NAME@champion``) a watcher thread checks every
    ``reload_seconds`` which version the alias names; when it moves (promote, rollback, the gate), the new version
    is loaded and tried beside the old one, then swapped in with one assignment. A request holds the version it
    started with, so none fails during the swap; a version that fails to load is logged and the old one stays.

    Serving ``@champion``, the watcher also follows the ``challenger`` of a live shadow or canary rollout
    (:mod:`pipelines.rollout`): it loads it beside the champion, publishes this replica's tally to the registry
    and rolls the challenger back when the pooled counts of every replica say so."""

    def __init__(self, model_uri: str, monitoring: MonitoringConfig | None = None, reload_seconds: float = 5.0,
                 replica: str | None = None):
        self.model_uri, self.monitoring = model_uri, monitoring
        self.replica = replica or rollout.replica_id()
        self.current = self._load(self._version())
        self.rollout: Rollout | None = None
        self._published: dict | None = None
        self._stop = threading.Event()
        if "@" in model_uri and reload_seconds > 0:
            threading.Thread(target=self._watch, args=(reload_seconds,), name="alias-watcher", daemon=True).start()

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
            try:
                self._follow_champion()
                if self.model_uri.startswith("models:/") and self.model_uri.endswith(f"@{rollout.CHAMPION}"):
                    self._follow_challenger(self.model_uri[len("models:/"):].rpartition("@")[0])
            except Exception as exc:  # the registry or the store not answering: keep serving what is loaded
                log.warning("%s: could not check or load a new version (%s); still serving version %s",
                            self.model_uri, _short(exc), self.current.version)

    def _follow_champion(self) -> None:
        named = self._version()
        if named is None or named[1] == self.current.version:
            return
        loaded = self._load(named)
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
            try:
                loaded = self._load((name, plan.version), rollout.CHALLENGER,
                                    "shadow" if plan.mode == "shadow" else "http")
            except TrialFailed as exc:  # it cannot answer at all: no replica should keep trying it
                rollout.roll_back(name, plan.version, f"{exc} on replica {self.replica}", self.replica)
                raise
            self.rollout = Rollout(plan, loaded, rollout.Tally(plan, self.current.version))
            log.warning("%s: version %s is live as challenger (%s%s)", name, plan.version, plan.mode,
                        f", {plan.share:.0%} of clients" if plan.mode == "canary" else "")
            return
        reason = rollout.worse_by(plan, rollout.pooled(challenger))
        if reason is not None and rollout.roll_back(name, plan.version, reason, self.replica):
            self._end(name, live)

    def _end(self, name: str, live: Rollout) -> None:
        """Stop serving the challenger of a rollout that has ended (promoted, rolled back or replaced)."""
        self.rollout = None
        log.warning("%s: the rollout of version %s has ended; the champion answers everything", name, live.plan.version)
        if live.challenger.inference_log is not None:
            live.challenger.inference_log.close()

    def _publish(self, name: str, live: Rollout) -> None:
        """Write this replica's tally on the challenger's version, when it changed."""
        from .registry import client

        report = live.tally.published()
        if report != self._published:
            client().set_model_version_tag(name, live.plan.version, rollout.REPLICA_PREFIX + self.replica,
                                           json.dumps(report, sort_keys=True))
            self._published = report

    def route(self, client_key: str) -> tuple[Loaded, str, Rollout | None]:
        """Which version answers a client: the canary's share of client keys go to the challenger."""
        live = self.rollout
        if live is not None and live.plan.mode == "canary" and rollout.to_challenger(live.plan, client_key):
            return live.challenger, rollout.CHALLENGER, live
        return self.current, rollout.CHAMPION, live

    def stop(self) -> None:
        self._stop.set()


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


def build_app(served: Served, batcher: MicroBatcher | None = None) -> Starlette:
    """The ASGI app answering with what ``served`` holds (a pyfunc model of this project). Each answer carries
    ``X-Request-Id`` (the client's, or a new one) and ``X-Model-Version`` (the version that answered). In a canary
    rollout ``X-Client-Key`` (else the client's address) picks the version; in shadow and canary rollouts the other
    version runs on the same images after the answer is sent, for the agreement."""
    from starlette.concurrency import run_in_threadpool

    from .inference_log import REQUEST_ID

    limit = max_body_bytes()
    batcher = batcher or MicroBatcher()
    comparing: set[asyncio.Task] = set()

    async def invocations(request: Request):
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # the worker thread runs in a copy of this context
        client_key = request.headers.get("x-client-key") or (request.client.host if request.client else "")
        loaded, role, live = served.route(client_key)  # this request's version, whatever a swap does meanwhile
        response: Response
        try:
            images = parse_request(await _read_body(request, limit))
            bundle_model = loaded.model.unwrap_python_model()
            if not hasattr(bundle_model, "recognise"):  # a version registered before batching: one call each
                import pandas as pd

                answers = await run_in_threadpool(loaded.model.predict, pd.DataFrame({"image": images}))
                response = JSONResponse({"predictions": answers.to_dict(orient="records")})
            else:
                try:
                    done = await _recognised(bundle_model, images, role, live)
                except _CanaryFailed:  # the champion answers; the failure counts against the canary
                    loaded, role = served.current, rollout.CHAMPION
                    bundle_model = loaded.model.unwrap_python_model()
                    done = await _recognised(bundle_model, images, role, None)
                bundle_model.record(done.images, done.matches, done.queries, done.started)
                if live is not None:
                    _compare(live, role, images, done)
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

    async def _recognised(model, images: list, role: str, live: Rollout | None) -> Recognised:
        """The answer of ``model``, counted in the rollout's tally; _CanaryFailed when the challenger fails on it."""
        try:
            done = await batcher.recognise(model, images)
        except ServerError:
            if live is not None:
                live.tally.add(role, len(images), 0, True, 0.0)
                if role == rollout.CHALLENGER:
                    raise _CanaryFailed() from None
            raise
        if live is not None:
            live.tally.add(role, len(done.matches), _unknown(done.matches), False,
                           1000 * (time.perf_counter() - done.started))
        return done

    def _compare(live: Rollout, role: str, images: list, answered: Recognised) -> None:
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
                done = await (_recognised(model, images, rollout.CHALLENGER, live) if shadow else
                              batcher.recognise(model, images))
            except (RequestError, ServerError, _CanaryFailed):
                return  # counted by _recognised in shadow mode; a champion failing is the champion's own log's
            agreement = live.tally.agree([m.label for m in answered.matches], [m.label for m in done.matches])
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
    checked against the digest recorded at registration, or of a local model folder."""
    from .registry import verified_download

    local = verified_download(model_uri) if model_uri.startswith("models:/") else model_uri
    return mlflow.pyfunc.load_model(str(local))


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
    set_threads(batching or ServingConfig())
    served = Served(model_uri, monitoring, reload_seconds, rollout.replica_id(port))
    if served.current.inference_log is not None:
        log.warning("logging every answer to %s", served.current.inference_log.uri)
    try:
        # httptools' C parser and uvloop: a third of a request's CPU went to the pure-Python parser
        uvicorn.run(build_app(served, MicroBatcher(batching)), host=host, port=port, log_level="warning",
                    access_log=False, http="httptools", loop="uvloop")
    finally:
        served.stop()
