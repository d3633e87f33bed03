"""What goes over the wire: a request's JSON read and checked against the limits, errors in one line, and the
connection-level limits (a request's head: its size and the time it takes to arrive).

Clients of ``mlflow models serve`` need no change: ``POST /invocations`` takes the same JSON (``dataframe_split``,
``dataframe_records``, ``inputs`` or ``instances``, with a column ``image`` of base64 image bytes). The body is
bounded (``$SIAMESE_MAX_BODY_BYTES``): a larger one is refused from its ``Content-Length``, or as soon as it has read
past the limit, before any of it is parsed; a body that takes longer than ``serving.body_seconds`` is a 408, a client
that goes away mid-body a quiet counted event. A request nested too deeply, or with huge keys, gets a short 400 that
echoes at most ``ECHO_CHARS`` characters of what it sent; a row in the wrong form gets one line naming the row and the
form expected; more images than ``$SIAMESE_MAX_REQUEST_ROWS`` a 400 before any work is taken on; a body that is not
JSON (``text/csv``, Parquet) a 415.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..params import ServingConfig
from ..pyfunc_model import max_request_rows

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
# Quiet events (a client gone mid-body) are logged at most this often.
QUIET_LOG_SECONDS = 60.0


class BadRequest(Exception):
    """A request refused before the model sees it; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Disconnected(Exception):
    """The client went away before its body arrived: nothing to answer."""


def short(value) -> str:
    """``value`` as text, cut to ``ECHO_CHARS`` characters with its length."""
    text = str(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def max_body_bytes() -> int:
    """The body limit: ``$SIAMESE_MAX_BODY_BYTES`` or the default."""
    value = os.environ.get("SIAMESE_MAX_BODY_BYTES", "")
    if value and not value.isdigit():
        raise ValueError(f"SIAMESE_MAX_BODY_BYTES={short(value)!r} is not a whole number of bytes")
    return int(value) if value else DEFAULT_MAX_BODY_BYTES


async def read_images(request: Request, limit: int, seconds: float) -> list:
    """The ``image`` values of a request whose body arrives within ``seconds`` and ``limit`` bytes (else a BadRequest:
    408, 413), parsed by :func:`parse_request`; Disconnected when the client leaves first."""
    try:
        async with asyncio.timeout(seconds):
            body = await _read_body(request, limit)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {seconds:g} s (serving.body_seconds)", 408) from None
    except ClientDisconnect:
        raise Disconnected() from None
    return parse_request(body, request.headers.get("content-type"))


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
    one-line BadRequest: 415 for a body declared as anything but JSON, 400 naming the row and the form expected, or
    more rows than ``$SIAMESE_MAX_REQUEST_ROWS``. A request without a Content-Type is read as JSON."""
    images = _images(body, content_type)
    most = max_request_rows()
    if len(images) > most:
        raise BadRequest(f"{len(images)} images in one request, over the limit of {most}; send them in several requests")
    return images


def _images(body: bytes, content_type: str | None) -> list:
    """The ``image`` values of :func:`parse_request`, however many."""
    media_type = (content_type or JSON_TYPE).split(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise BadRequest(f"Content-Type {short(content_type)!r} is not accepted: this server takes JSON only "
                         f"(Content-Type: {JSON_TYPE}, an object with one key of {list(INPUT_FORMATS)})", 415)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(("depth limit", "recursion limit")):
            raise BadRequest("the request JSON is nested too deeply") from None
        raise BadRequest(f"the request is not valid JSON ({short(exc)})") from None
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in INPUT_FORMATS:
        keys = [short(k) for k in payload][:5] if isinstance(payload, dict) else type(payload).__name__
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
    shown = [short(c) for c in columns[:5]]
    return BadRequest(f"the request needs a column 'image' of base64-encoded images, got columns {shown}{where}")


def _split_images(data) -> list:
    """The ``image`` values of a ``dataframe_split`` table: rows are lists in the order of ``columns``."""
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or not isinstance(data.get("data"), list):
        raise BadRequest(f"'dataframe_split' must be an object {SPLIT}, got {_what(data)}"
                         + (f" with keys {[short(k) for k in data][:5]}" if isinstance(data, dict) else ""))
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




def error(message: str, status: int, code: str = "INVALID_PARAMETER_VALUE") -> JSONResponse:
    """An error answer in MLflow's form."""
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


class Quiet:
    """An event counted every time and logged at most once every ``QUIET_LOG_SECONDS``, with the count so far."""

    def __init__(self, what: str, clock=time.monotonic):
        self.what, self.clock = what, clock
        self.count = 0
        self._logged_at: float | None = None

    def happened(self) -> None:
        self.count += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= QUIET_LOG_SECONDS:
            log.warning("%s (%d so far; at most one such line a minute, every one counted in /metrics)", self.what,
                        self.count)
            self._logged_at = now


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with limits on a request's head: more than ``max_header_bytes`` is answered 431, a
    head that takes longer than ``header_seconds`` to arrive 408; either way the connection is closed, before the
    app sees anything. ``limits`` and ``refused`` (called with 431 or 408) are set by :func:`guarded`."""

    limits: ServingConfig
    refused = staticmethod(lambda status: None)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes, self._reading_head = 0, True
        self._head_timer = self.loop.call_later(self.limits.header_seconds, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"the request head is over {self.limits.max_header_bytes} bytes "
                                  "(serving.max_header_bytes)")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.header_seconds, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_timer.cancel()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes, self._reading_head = 0, True

    def _head_too_slow(self) -> None:
        if self._reading_head and not self.transport.is_closing():
            self._refuse(408, f"the request head did not arrive within {self.limits.header_seconds:g} s "
                              "(serving.header_seconds)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` and close the connection."""
        self._reading_head = False
        self.refused(status)
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = orjson.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()


def guarded(settings: ServingConfig, refused) -> type[GuardedProtocol]:
    """:class:`GuardedProtocol` with ``settings``' limits, calling ``refused(status)`` for each connection it cuts."""
    return type("Guarded", (GuardedProtocol,), {"limits": settings, "refused": staticmethod(refused)})
