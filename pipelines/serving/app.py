"""The app: ``POST /invocations`` over the batcher, the probes and reports, and ``serve()``, which runs it under uvicorn
with the connection limits and drains on SIGTERM.

Each answer carries ``X-Request-Id`` (the client's, or a new one, passed on to the log with the request) and
``X-Model-Version``. ``GET /ping`` says the process is alive; ``GET /ready`` that a model is loaded and work is taken on
(else 503 with why); ``GET /version`` which version answers; ``GET /stats`` the accepted work and the log's counts;
``GET /metrics`` all of it for Prometheus.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import resource
import signal
import sys
import time
import uuid
from importlib.metadata import version as package_version

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from threadpoolctl import threadpool_limits

from .. import rollout
from ..inference_log import UNKNOWN
from ..params import MonitoringConfig, ServingConfig
from ..pyfunc_model import DeadlinePassed, RequestError, ServerError, answer_records
from .batcher import Batcher, Shed
from .following import Rollout, Served
from .metrics import ServerMetrics
from .protocol import BadRequest, Disconnected, Quiet, error, guarded, max_body_bytes, read_images

log = logging.getLogger(__name__)

# Comparisons (shadow runs, canary checks) in flight at once; beyond it a request is not compared, and counted.
MAX_COMPARISONS = 64


class Drain:
    """How the server stops: ``since`` it was told to (None: serving), and the requests answered so far."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.answered = 0


def build_app(served: Served, batcher: Batcher | None = None, settings: ServingConfig | None = None,
              metrics: ServerMetrics | None = None, drain: Drain | None = None) -> Starlette:
    """The ASGI app answering with what ``served`` holds. In a canary rollout the client key picks the version: the
    header ``settings.client_key_header`` that a trusted proxy sets, else the connection's address (a header the client
    picks is never read). In shadow and canary rollouts the other version runs on the same images after the answer is
    sent, for the agreement; each client key counts in the rollout's tally as far as the plan's ``key_cap`` allows."""
    settings = settings or ServingConfig()
    batcher = batcher or Batcher(settings)
    metrics = metrics or ServerMetrics()
    metrics.follow(served, batcher)
    drain = drain or Drain()
    limit = max_body_bytes()
    gone = Quiet("a client went away before its request's body arrived")
    comparing: set[asyncio.Task] = set()

    async def invocations(request: Request) -> Response:
        arrived = time.monotonic()
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        header = settings.client_key_header
        client_key = (request.headers.get(header) if header else None) or (request.client.host if request.client else "")
        loaded, role, live = served.route(client_key)  # this request's version, whatever a swap does meanwhile
        response: Response
        try:
            images = await read_images(request, limit, settings.body_seconds)
            admitted = None if live is None else live.tally.admit(client_key, len(images))
            try:
                matches = await _answered(loaded.model, images, request_id, arrived, role, live, admitted)
            except _CanaryFailed:  # the champion answers; the failure counts against the canary
                loaded, role = served.current, rollout.CHAMPION
                matches = await _answered(loaded.model, images, request_id, arrived, role, None, None)
            if live is not None:
                _compare(live, role, images, matches, admitted, request_id)
            response = Response(orjson.dumps({"predictions": answer_records(matches)}), media_type="application/json")
        except Disconnected:
            metrics.disconnects.inc()
            gone.happened()
            return Response(status_code=400)  # no one reads it
        except (Shed, DeadlinePassed) as exc:
            metrics.shed.labels("deadline" if isinstance(exc, DeadlinePassed) else exc.reason).inc()
            response = error(str(exc), 503, "TEMPORARILY_UNAVAILABLE")
            response.headers["Retry-After"] = str(exc.retry_after if isinstance(exc, Shed) else batcher.retry_after())
        except BadRequest as exc:
            response = error(str(exc), exc.status)
            if exc.status == 408:
                response.headers["Connection"] = "close"
        except RequestError as exc:
            response = error(exc.message, 400)
        except ServerError as exc:
            response = error(exc.message, 500, "INTERNAL_ERROR")
        except Exception:
            log.exception("prediction failed")
            response = error("the recogniser failed on this request; the server log has the details", 500,
                             "INTERNAL_ERROR")
        response.headers["X-Request-Id"] = request_id
        if loaded.version is not None:
            response.headers["X-Model-Version"] = loaded.version
        _count(response.status_code, arrived)
        return response

    def _count(status: int, arrived: float) -> None:
        metrics.requests.labels(str(status)).inc()
        drain.answered += 1
        if status == 200:
            metrics.latency.observe(time.monotonic() - arrived)
        elif status != 503:
            metrics.errors.labels(str(status)).inc()

    async def _answered(model, images: list, request_id: str, arrived: float, role: str, live: Rollout | None,
                        admitted: rollout.Admitted | None, client_labels: list[str] | None = None) -> list:
        """The answer of ``model``, counted in the rollout's tally as far as ``admitted`` lets it; _CanaryFailed when
        the challenger fails on it."""
        try:
            matches = await batcher.answer(model, images, request_id, arrived, client_labels)
        except ServerError:
            if live is not None:
                if admitted is not None:
                    live.tally.add(role, admitted, 0, True, 0.0)
                if role == rollout.CHALLENGER:
                    raise _CanaryFailed() from None
            raise
        if live is not None and admitted is not None:
            live.tally.add(role, admitted, _unknown(matches[:admitted.images]), False,
                           1000 * (time.monotonic() - arrived))
        return matches

    def _compare(live: Rollout, role: str, images: list, answered: list, admitted: rollout.Admitted | None,
                 request_id: str) -> None:
        """Run the other version on the request's images after answering: every request in shadow mode (the
        challenger, logged as ``shadow`` with its agreement), the canary's requests in canary mode (the champion,
        not logged)."""
        other = (live.challenger if live.plan.mode == "shadow" and role == rollout.CHAMPION else
                 served.current if live.plan.mode == "canary" and role == rollout.CHALLENGER else None)
        if other is None:
            return
        if len(comparing) >= MAX_COMPARISONS:
            live.tally.skip()
            return
        labels = [m.label for m in answered]

        async def compare():
            started = time.monotonic()
            try:
                if live.plan.mode == "shadow":
                    done = await _answered(other.model, images, request_id, started, rollout.CHALLENGER, live,
                                           admitted, labels)
                else:
                    done = await batcher.answer(other.model, images, request_id, started, recorded=False)
            except Shed:
                live.tally.skip()  # no time for it: not compared, and counted
                return
            except (RequestError, ServerError, _CanaryFailed):
                return  # counted by _answered in shadow mode; a champion failing is the champion's own log's
            live.tally.agree(labels, [m.label for m in done], admitted)

        task = asyncio.get_running_loop().create_task(compare())
        comparing.add(task)
        task.add_done_callback(comparing.discard)

    async def ping(request: Request) -> Response:
        return PlainTextResponse("\n")

    async def ready(request: Request) -> Response:
        why = "stopping" if drain.since is not None else batcher.overloaded()  # loaded before it listens
        return PlainTextResponse("ready\n" if why is None else f"not ready: {why}\n", 200 if why is None else 503)

    async def version(request: Request) -> Response:
        loaded = served.current
        which = "" if loaded.version is None else f", version {loaded.version}"
        live = served.rollout
        staged = "" if live is None else f"; challenger version {live.plan.version} in {live.plan.mode}"
        return PlainTextResponse(f"{served.model_uri}{which}{staged} "
                                 f"(siamese-recognizer {package_version('siamese-recognizer')})")

    async def stats(request: Request) -> Response:
        loaded, live = served.current, served.rollout
        return JSONResponse({"model": served.model_uri, "version": loaded.version, "batching": batcher.counts,
                             "replica": served.replica,
                             "rollout": None if live is None else {"version": live.plan.version, "mode": live.plan.mode,
                                                                   **live.tally.published()},
                             "inference_log": None if loaded.inference_log is None else
                             {"uri": loaded.inference_log.uri, **loaded.inference_log.stats()}})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ])


class _CanaryFailed(Exception):
    """The challenger failed on a request it was to answer (counted); the champion answers instead."""


def _unknown(matches: list) -> int:
    return sum(m.label == UNKNOWN for m in matches)


class _Draining(uvicorn.Server):
    """uvicorn's server that, told to stop, answers what it holds within ``drain_seconds`` (uvicorn's graceful
    shutdown: no new connections, requests in progress answered), writes the log records of the answered requests
    and says so in one line."""

    def __init__(self, config: uvicorn.Config, served: Served, drain: Drain):
        super().__init__(config)
        self.served, self.drain = served, drain

    async def shutdown(self, sockets=None) -> None:
        self.drain.since = started = time.monotonic()
        answered, written = self.drain.answered, self.served.written()
        await super().shutdown(sockets)
        self.served.stop()
        print(f"stopped: drained {self.drain.answered - answered} requests, flushed "
              f"{self.served.written() - written} log records, in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)


def _return_large_blocks_to_the_system() -> None:
    """Have glibc's malloc map every block of 1 MiB or more on its own, so a decoded image's memory goes back
    to the system when it is freed. By default the threshold rises after such a free, and later images
    land in per-thread heaps that keep their size (the server kept 360 MiB after six near-limit requests)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _allow_connections(connections: int) -> None:
    """Raise the process's descriptor limit to fit ``connections`` and some to spare, as far as the hard limit
    allows: past it, new clients would be reset instead of answered 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def set_threads(settings: ServingConfig) -> None:
    """Threads for this machine, set before TensorFlow runs anything: the forward pass uses ``tf_threads`` (0: every
    core), and BLAS one thread (the gallery search is one small matrix product per batch; more threads only
    contend with TensorFlow's)."""
    import tensorflow as tf  # heavy: loaded when a server starts, not when this module is imported

    threadpool_limits(1)
    cores = settings.tf_threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already ran an op in this process (a test's): its threads stay
        pass


def serve(model_uri: str, host: str, port: int, monitoring: MonitoringConfig | None = None,
          reload_seconds: float = 5.0, settings: ServingConfig | None = None) -> None:
    """Load the model, then serve it until SIGTERM or Ctrl-C, logging its answers as ``monitoring`` says (None: no
    log) and following its alias every ``reload_seconds`` (0: never); stopping, drain and say what was drained."""
    _return_large_blocks_to_the_system()
    settings = settings or ServingConfig()
    set_threads(settings)
    _allow_connections(settings.max_connections)
    served = Served(model_uri, monitoring, reload_seconds, rollout.replica_id(port), settings.code_mismatch)
    if served.current.inference_log is not None:
        print(f"logging every answer to {served.current.inference_log.uri}", file=sys.stderr, flush=True)
    metrics, drain = ServerMetrics(), Drain()
    app = build_app(served, Batcher(settings, metrics.batch_images), settings, metrics, drain)
    # httptools' C parser (under the limits of GuardedProtocol) and uvloop: a third of a request's CPU went to the
    # pure-Python parser
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, loop="uvloop",
                            http=guarded(settings, lambda status: metrics.refused.labels(str(status)).inc()),
                            limit_concurrency=settings.max_connections,
                            timeout_graceful_shutdown=math.ceil(settings.drain_seconds))
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn raises the SIGTERM it drained for again once it returns
    try:
        _Draining(config, served, drain).run()
    finally:
        served.stop()
