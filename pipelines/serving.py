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

import json
import logging
import os
import uuid
from importlib.metadata import version as package_version

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .inference_log import attach, open_log
from .params import MonitoringConfig
from .pyfunc_model import RequestError, ServerError

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


def parse_request(body: bytes) -> pd.DataFrame:
    """The ``image`` column of a request in one of MLflow's input formats, or BadRequest."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise BadRequest("the request JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request is not valid JSON ({_short(exc)})") from None
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in INPUT_FORMATS:
        keys = [_short(k) for k in payload][:5] if isinstance(payload, dict) else type(payload).__name__
        raise BadRequest(f"the request must be a JSON object with one key of {list(INPUT_FORMATS)}, got {keys}")
    kind, data = next(iter(payload.items()))
    try:
        if kind == "dataframe_split":
            frame = pd.DataFrame(data["data"], columns=data["columns"])
        elif kind == "dataframe_records":
            frame = pd.DataFrame.from_records(data)
        elif isinstance(data, dict):  # inputs / instances as columns
            frame = pd.DataFrame(data)
        else:  # inputs / instances as rows: records, or bare base64 strings
            frame = pd.DataFrame.from_records(data) if data and isinstance(data[0], dict) else pd.DataFrame({"image": data})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise BadRequest(f"'{kind}' is not a table of images ({_short(exc)})") from None
    if "image" not in frame.columns:
        columns = [_short(c) for c in frame.columns[:5]]
        raise BadRequest(f"the request needs a column 'image' of base64-encoded images, got columns {columns}")
    return frame[["image"]]


def _error(message: str, status: int, code: str = "INVALID_PARAMETER_VALUE") -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def build_app(model, model_uri: str, inference_log=None) -> Starlette:
    """The ASGI app serving ``model`` (a loaded pyfunc model of this project) as ``model_uri``; its answers are
    logged to ``inference_log`` when given. Each answer carries ``X-Request-Id`` (the client's, or a new one)."""
    from starlette.concurrency import run_in_threadpool

    from .inference_log import REQUEST_ID

    limit = max_body_bytes()

    async def invocations(request: Request):
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # the worker thread runs in a copy of this context
        response = await _answer(request)
        response.headers["X-Request-Id"] = request_id
        return response

    async def _answer(request: Request):
        try:
            frame = parse_request(await _read_body(request, limit))
            answers = await run_in_threadpool(model.predict, frame)
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        except RequestError as exc:
            return _error(exc.message, 400)
        except ServerError as exc:
            return _error(exc.message, 500, "INTERNAL_ERROR")
        except MlflowException as exc:  # MLflow's schema check, before the model sees the request
            return _error(_short(str(exc.message).splitlines()[0] if exc.message else exc.error_code), 400)
        except Exception:
            log.exception("prediction failed")
            return _error("the recogniser failed on this request; the server log has the details", 500,
                          "INTERNAL_ERROR")
        return JSONResponse({"predictions": answers.to_dict(orient="records")})

    async def ping(request: Request):
        return PlainTextResponse("\n")

    async def version(request: Request):
        return PlainTextResponse(f"{model_uri} (siamese-recognizer {package_version('siamese-recognizer')})")

    async def stats(request: Request):
        return JSONResponse({"model": model_uri, "inference_log": None if inference_log is None else
                             {"uri": inference_log.uri, **inference_log.stats()}})

    return Starlette(routes=[
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ])


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


def serve(model_uri: str, host: str, port: int, monitoring: MonitoringConfig | None = None) -> None:
    """Load the model, then serve it until interrupted, logging its answers as ``monitoring`` says (None: no log)."""
    import uvicorn

    _return_large_blocks_to_the_system()

    from .pyfunc_model import SERVER_TIMEOUT_VARIABLE

    os.environ.setdefault(SERVER_TIMEOUT_VARIABLE, "60")  # the time limit per request, as mlflow models serve's
    model = load_for_serving(model_uri)
    inference_log = attach(model, open_log(monitoring, model_uri, "http") if monitoring is not None else None)
    if inference_log is not None:
        log.warning("logging every answer to %s", inference_log.uri)
    app = build_app(model, model_uri, inference_log)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
