"""The stack's S3 server: moto's, behind a check that every request is signed with the stack's key and fresh,
with every change kept in a journal file.

``python -m pipelines.s3server HOST PORT JOURNAL`` reads the key from ``$AWS_ACCESS_KEY_ID`` and
``$AWS_SECRET_ACCESS_KEY`` (never from the command line). ``python -m pipelines.s3server repair JOURNAL``
keeps the intact records of a damaged journal (:meth:`Journal.repair`).

Requests. Each must carry an AWS Signature Version 4 made with that key, in its ``Authorization`` header
(SDK calls) or in its query string (the presigned URLs the MLflow server hands out for downloads);
anything else gets 403. A signed request is good within 15 minutes of its ``X-Amz-Date`` (403
RequestTimeTooSkewed after, or before), a presigned URL until it expires (7 days at most). A payload hash
the client declares (``x-amz-content-sha256``) must be the body's (400 XAmzContentSHA256Mismatch), so a
captured request cannot carry another body; ``UNSIGNED-PAYLOAD`` leaves the body unchecked, as on AWS, and
signed chunks (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``) are refused as not implemented. moto's admin API
(``/moto-api``: reset, state) answers 404. The access log names a request's query parameters without
their values: no signature or credential of a presigned URL reaches it.

The journal. moto keeps the bucket in memory. So a request that may change it (PUT, POST, DELETE) is first
appended to the journal and the file synced to disk, and only then given to moto; a change moto refuses
is marked refused after it. (A CreateMultipartUpload, which makes no object, goes the other way round, for
the upload id moto gives, and is aborted if its journal write fails.) A change whose journal write fails
(a full disk) is answered 507 (500 for other errors) and never applied. When the server starts it
replays the journal into a fresh moto, so what a client was told is stored outlives a crash or
``kill -9``. Every record carries checksums: a last record cut short by a crash (its client never got an
answer) is dropped with a warning; any other damage stops the server in one line naming the byte, and
the journal is left as it is. The journal only grows: it holds every version of every object written,
deleted ones too.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import mmap
import os
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, quote, urlencode
from xml.sax.saxutils import escape

from werkzeug.serving import WSGIRequestHandler, run_simple
from werkzeug.wsgi import get_input_stream

ALGORITHM = "AWS4-HMAC-SHA256"
CHANGES = ("PUT", "POST", "DELETE")  # the methods of the requests that may change the bucket
MAX_SKEW_S = 15 * 60  # how far a signed request's time may be from the server's
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a presigned URL may live, as on AWS
UNSIGNED_PAYLOADS = ("UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Answer = tuple[str, list[tuple[str, str]], bytes]  # status line, headers, body


# ---------------------------------------------------------------- signed requests only


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: its HTTP status line, S3 error code and message."""

    message: str
    code: str = "AccessDenied"
    status: str = "403 Forbidden"

    def answer(self) -> Answer:
        return self.status, [("Content-Type", "application/xml")], _error_xml(self.code, self.message)


def _error_xml(code: str, message: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>".encode()


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def _header(environ: dict, name: str) -> str:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}", "")
    return " ".join(str(value).split())


def _signature(environ: dict, secret: str, query: list[tuple[str, str]], signed_headers: str, payload_hash: str,
               amz_date: str, scope: str) -> str:
    """The SigV4 signature of the request as ``environ`` describes it."""
    path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or quote(environ.get("PATH_INFO", "/"))
    path = path.split("?", 1)[0]
    canonical_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(query))
    headers = "".join(f"{name}:{_header(environ, name)}\n" for name in signed_headers.split(";"))
    canonical = "\n".join([environ["REQUEST_METHOD"], path, canonical_query, headers, signed_headers, payload_hash])
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def refusal(environ: dict, access_key_id: str, secret: str, now: float | None = None) -> Refusal | None:
    """Why a request is refused, or None when it is signed with the stack's key and fresh."""
    now = time.time() if now is None else now
    query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    fields = dict(query)
    presigned = "X-Amz-Signature" in fields
    if presigned:
        if fields.get("X-Amz-Algorithm") != ALGORITHM:
            return Refusal("unsupported signature algorithm")
        credential, amz_date = fields.get("X-Amz-Credential", ""), fields.get("X-Amz-Date", "")
        signed_headers, given = fields.get("X-Amz-SignedHeaders", ""), fields["X-Amz-Signature"]
        query = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        payload_hash = "UNSIGNED-PAYLOAD"
    else:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if not authorization.startswith(ALGORITHM + " "):
            return Refusal("requests must be signed (AWS Signature Version 4)")
        parts = dict(p.strip().split("=", 1) for p in authorization[len(ALGORITHM):].split(",") if "=" in p)
        credential, signed_headers, given = parts.get("Credential", ""), parts.get("SignedHeaders", ""), \
            parts.get("Signature", "")
        amz_date, payload_hash = _header(environ, "x-amz-date"), _header(environ, "x-amz-content-sha256")
    key_id, _, scope = credential.partition("/")
    if not hmac.compare_digest(key_id, access_key_id):
        return Refusal("unknown access key")
    expected = _signature(environ, secret, query, signed_headers, payload_hash or "UNSIGNED-PAYLOAD", amz_date, scope)
    if not hmac.compare_digest(expected, given):
        return Refusal("the signature does not match")
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return Refusal("malformed X-Amz-Date")
    if scope.split("/")[0] != amz_date[:8]:
        return Refusal("the credential's date is not the request's X-Amz-Date")
    if signed_at - now > MAX_SKEW_S:
        return Refusal("the request is signed for a time more than 15 minutes ahead", "RequestTimeTooSkewed")
    if presigned:
        expires = fields.get("X-Amz-Expires", "")
        if not expires.isdigit() or not 1 <= int(expires) <= MAX_EXPIRES_S:
            return Refusal(f"X-Amz-Expires must be 1 to {MAX_EXPIRES_S} seconds", "AuthorizationQueryParametersError",
                           "400 Bad Request")
        return Refusal("the presigned URL has expired") if now > signed_at + int(expires) else None
    if now - signed_at > MAX_SKEW_S:
        return Refusal("the request was signed more than 15 minutes ago", "RequestTimeTooSkewed")
    return None


def payload_refusal(environ: dict, body: bytes) -> Refusal | None:
    """Why the body is refused: the payload hash the signature covers (``x-amz-content-sha256``) is not its."""
    declared = _header(environ, "x-amz-content-sha256")
    if not declared or declared in UNSIGNED_PAYLOADS:
        return None
    if declared.startswith("STREAMING-"):
        return Refusal(f"x-amz-content-sha256 {declared}: signed chunks are not supported here; sign the payload's "
                       "sha256 or send UNSIGNED-PAYLOAD", "NotImplemented", "501 Not Implemented")
    if not re.fullmatch("[0-9a-f]{64}", declared):
        return Refusal("x-amz-content-sha256 is neither a sha256 nor UNSIGNED-PAYLOAD", "InvalidArgument",
                       "400 Bad Request")
    if not hmac.compare_digest(declared, hashlib.sha256(body).hexdigest()):
        return Refusal("the x-amz-content-sha256 header does not match the body", "XAmzContentSHA256Mismatch",
                       "400 Bad Request")
    return None


def _with_body(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    """``environ`` with ``body`` as its whole input (no chunked transfer any more)."""
    kept = {k: v for k, v in environ.items() if k not in ("HTTP_TRANSFER_ENCODING", "wsgi.input_terminated")}
    return {**kept, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}


class SignedOnly:
    """WSGI middleware: 404 for moto's admin API, a refusal for a request not signed with the key, not fresh,
    or whose body is not the one signed; else moto."""

    def __init__(self, app: WsgiApp, access_key_id: str, secret: str):
        self.app, self.access_key_id, self.secret = app, access_key_id, secret

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        problem = refusal(environ, self.access_key_id, self.secret)
        body = b"" if problem else get_input_stream(environ).read()
        problem = problem or payload_refusal(environ, body)
        if problem:
            status, headers, content = problem.answer()
            start_response(status, headers)
            return [content]
        return self.app(_with_body(environ, body), start_response)


def names_only(text: str) -> str:
    """``text`` with every URL query in it reduced to its parameters' names."""
    return re.sub(r"\?([^\s\"']*)", lambda found: "?" + "&".join(
        part.split("=", 1)[0] for part in found.group(1).split("&")), text)


class RedactingRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, logging query parameters by name only (a presigned URL in a log would
    let anyone who reads it download the object)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        line = self.requestline.encode("unicode_escape").decode()  # as received, control characters escaped
        self.log("info", '"%s" %s %s', line, code, size)

    def log(self, type: str, message: str, *args: Any) -> None:
        super().log(type, "%s", names_only(message % args if args else message))


# ---------------------------------------------------------------- the journal


def call(app: WsgiApp, fields: dict[str, str], body: bytes) -> Answer:
    """Run one request through a WSGI app: its environ's text ``fields`` and its ``body``; the answer's
    status line, headers and body."""
    environ: dict[str, Any] = {**fields, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
                               "wsgi.errors": sys.stderr, "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
                               "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        answer.update(status=status, headers=headers)
        return lambda data: None

    chunks = app(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()
    return answer["status"], answer["headers"], content


def _upload_id(content: bytes) -> str | None:
    """The UploadId in the answer to CreateMultipartUpload."""
    found = re.search(rb"<UploadId>([^<]+)</UploadId>", content)
    return found.group(1).decode() if found else None


def _creates_upload(fields: dict[str, str]) -> bool:
    """Whether the request is a CreateMultipartUpload (POST ?uploads)."""
    return fields["REQUEST_METHOD"] == "POST" and "uploads" in dict(
        parse_qsl(fields.get("QUERY_STRING", ""), keep_blank_values=True))


MAGIC = b"S3J2"
FRAME = re.compile(rb"S3J2 (\d{1,12}) (\d{1,15}) ([0-9a-f]{64}) ([0-9a-f]{8})\n")
FRAME_MAX = 128  # longer than any frame line


class JournalDamaged(ValueError):
    """A journal record that is neither intact nor a last record cut short; the message is one line."""


class _Torn(Exception):
    """The journal's last record is cut short at ``offset`` (a crash while it was written)."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


@dataclass(frozen=True)
class Record:
    """One journal record: where it starts and ends, its JSON header, its body and the sha256 of both
    (None in a record from before the checksums)."""

    start: int
    end: int
    header: dict[str, Any]
    body: bytes
    digest: str | None


def _shape_problem(header: Any, with_length: bool) -> str | None:
    """What is wrong with a record's header: a change ({"fields": {...}, "upload_id": ...}, with ``"body": N``
    in a record from before the checksums) or the mark of a refused change ({"refused": digest})."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__}, not an object"
    if "refused" in header:
        return None if isinstance(header["refused"], str) and not with_length else "a malformed refusal mark"
    fields = header.get("fields")
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        return "no 'fields' object of strings"
    if fields.get("REQUEST_METHOD") not in CHANGES or not isinstance(fields.get("PATH_INFO"), str):
        return "its fields name no change (REQUEST_METHOD, PATH_INFO)"
    if not isinstance(header.get("upload_id"), str | None):
        return "a malformed upload_id"
    length = header.get("body")
    if with_length and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        return "no body length"
    return None


def _mapped(journal: BinaryIO) -> Any:
    """The whole file, mapped into memory (an empty one cannot be mapped)."""
    if os.fstat(journal.fileno()).st_size == 0:
        return nullcontext(b"")
    return mmap.mmap(journal.fileno(), 0, access=mmap.ACCESS_READ)


class Journal:
    """The changes given to moto, in order, in an append-only file.

    A record: a frame line ``S3J2 <header bytes> <body bytes> <sha256 of header and body> <crc32 of the
    line before it>``, then the header (JSON: the request's environ ``fields`` and, for
    CreateMultipartUpload, the ``upload_id`` moto gave; or ``{"refused": <sha256 of a change>}``), then
    the body. Journals written before the checksums (per record a JSON line with ``"body": N``, then the
    body) still replay, but any irregularity in such a record is reported as damage, never cut off.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # one change at a time: moto applies them in the journal's order
        self.broken: str | None = None  # why no record may be added: a failed write could not be undone

    # ---- writing

    def append_change(self, fields: dict[str, str], body: bytes, upload_id: str | None = None) -> str:
        """Add one change and sync it to disk; its digest (for :meth:`append_refusal`)."""
        header: dict[str, Any] = {"fields": fields}
        if upload_id is not None:
            header["upload_id"] = upload_id
        return self._append(header, body)

    def append_refusal(self, digest: str) -> None:
        """Mark the change just added (``digest``) as refused by moto: replay skips it."""
        self._append({"refused": digest}, b"")

    def _append(self, header: dict[str, Any], body: bytes) -> str:
        """Add one record and sync the file; on a failure the file is left as it was, or, if even that
        fails, the journal takes no more records until the server restarts."""
        if self.broken:
            raise OSError(errno.EIO, self.broken)
        head = json.dumps(header).encode()
        content = hashlib.sha256(head)
        content.update(body)
        frame = b"%s %d %d %s" % (MAGIC, len(head), len(body), content.hexdigest().encode())
        data = memoryview(b"%s %08x\n" % (frame, zlib.crc32(frame)) + head + body)
        created = not self.path.exists()
        journal = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            end = os.lseek(journal, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(journal, data):]
                os.fsync(journal)
            except OSError:  # a full disk: no half record for the next ones to follow
                try:
                    os.ftruncate(journal, end)
                except OSError as exc:
                    self.broken = f"a failed write at byte {end} could not be undone ({exc.strerror}): restart"
                raise
        finally:
            os.close(journal)
        if created:  # the new file's name must outlive a crash too
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return content.hexdigest()

    # ---- reading

    def _damage(self, offset: int, reason: str) -> JournalDamaged:
        return JournalDamaged(
            f"journal {self.path}: the record at byte {offset} is damaged ({reason}); the S3 server does not start "
            f"and leaves the journal as it is: restore it from a backup, or keep every intact record with "
            f"`python -m pipelines.s3server repair {self.path}`")

    def _read(self, journal: BinaryIO) -> Record | None:
        """The record at the file's position, or None at its end. Raises :class:`_Torn` for a last record
        cut short, :class:`JournalDamaged` for any other damage."""
        start = journal.tell()
        line = journal.readline(FRAME_MAX)
        if not line:
            return None
        if not line.startswith(MAGIC[:1]):
            return self._read_unchecked(journal, start, line if line.endswith(b"\n") else line + journal.readline())
        frame = FRAME.fullmatch(line)
        if frame is None:
            cut_short = not line.endswith(b"\n") and len(line) < FRAME_MAX  # the file ends inside the line
            if cut_short and line.startswith(MAGIC[:len(line)]) and re.fullmatch(rb"[ 0-9a-f]*", line[4:]):
                raise _Torn(start)
            raise self._damage(start, "no record frame")
        if zlib.crc32(line[:frame.start(4) - 1]) != int(frame[4], 16):
            raise self._damage(start, "its frame line fails its checksum")
        head_size, body_size = int(frame[1]), int(frame[2])
        data = journal.read(head_size + body_size)
        if len(data) < head_size + body_size:
            raise _Torn(start)
        digest = hashlib.sha256(data).hexdigest()
        if digest != frame[3].decode():
            raise self._damage(start, "its content fails its checksum")
        return self._record(start, journal.tell(), data[:head_size], data[head_size:], digest)

    def _read_unchecked(self, journal: BinaryIO, start: int, line: bytes) -> Record:
        """A record from before the checksums: a JSON line, then the body."""
        if not line.endswith(b"\n"):
            raise self._damage(start, "a record from before checksums that does not end")
        header = self._record(start, start, line, b"", None).header
        body = journal.read(header["body"])
        if len(body) < header["body"]:
            raise self._damage(start, f"a record from before checksums with {len(body)} of its {header['body']} bytes")
        return Record(start, journal.tell(), header, body, None)

    def _record(self, start: int, end: int, head: bytes, body: bytes, digest: str | None) -> Record:
        try:
            header = json.loads(head)
        except ValueError:
            raise self._damage(start, "its header is not JSON") from None
        problem = _shape_problem(header, with_length=digest is None)
        if problem:
            raise self._damage(start, f"not a journal record: {problem}")
        return Record(start, end, header, body, digest)

    def records(self, journal: BinaryIO) -> Iterator[Record]:
        """Every record from the file's position on; :class:`_Torn` at a last record cut short."""
        while (record := self._read(journal)) is not None:
            yield record

    # ---- replay and repair

    def replay(self, app: WsgiApp) -> int:
        """Apply every change in the journal, less those marked refused, to ``app`` (a fresh moto); the
        number applied. A last record cut short by a crash is cut off the file; other damage raises
        :class:`JournalDamaged` before the file is touched."""
        if not self.path.exists():
            return 0
        uploads: dict[str, str] = {}  # the upload ids of the journal -> those of this moto
        applied = 0
        pending: Record | None = None  # the last change: applied unless the next record marks it refused
        with open(self.path, "rb") as journal:
            try:
                for record in self.records(journal):
                    if "refused" in record.header:
                        if pending and pending.digest == record.header["refused"]:
                            pending = None
                        continue
                    if pending:
                        applied += self._apply(app, pending, uploads)
                    pending = record
            except _Torn as torn:
                size = os.fstat(journal.fileno()).st_size
                print(f"journal {self.path}: dropped a last record cut short at byte {torn.offset} "
                      f"({size - torn.offset} bytes; its client got no answer)", file=sys.stderr)
                os.truncate(self.path, torn.offset)
        if pending:
            applied += self._apply(app, pending, uploads)
        return applied

    def _apply(self, app: WsgiApp, record: Record, uploads: dict[str, str]) -> int:
        """Give one change to ``app``, its upload id mapped to the one ``app`` gave; 1."""
        fields = record.header["fields"]
        query = parse_qsl(fields.get("QUERY_STRING", ""), keep_blank_values=True)
        if any(name == "uploadId" for name, _ in query):
            fields = {**fields, "QUERY_STRING": urlencode(
                [(name, uploads.get(value, value) if name == "uploadId" else value) for name, value in query])}
        status, _, content = call(app, fields, record.body)
        if not status.startswith("2"):
            print(f"journal {self.path}: replaying {fields['REQUEST_METHOD']} {fields['PATH_INFO']} (byte "
                  f"{record.start}) answered {status}", file=sys.stderr)
        if record.header.get("upload_id"):
            uploads[record.header["upload_id"]] = _upload_id(content) or record.header["upload_id"]
        return 1

    def repair(self) -> str:
        """Keep every intact record: the journal as it was moves to ``<journal>.damaged`` and a new journal
        holds its intact records (past a damaged one, reading resumes at the next record that checks out;
        a last record cut short is left out); what was done, in one line."""
        aside = self.path.with_name(self.path.name + ".damaged")
        if aside.exists():
            raise JournalDamaged(f"{aside} exists (the journal an earlier repair set aside): move it away first")
        fresh = self.path.with_name(self.path.name + ".repairing")
        kept, left_out, damaged_from = 0, [], None
        with open(self.path, "rb") as journal, _mapped(journal) as whole, \
                open(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            offset = 0
            while offset < len(whole):
                journal.seek(offset)
                try:
                    record = self._read(journal)
                except (_Torn, JournalDamaged):
                    damaged_from = offset if damaged_from is None else damaged_from
                    found = whole.find(MAGIC, offset + 1)
                    offset = len(whole) if found < 0 else found
                    continue
                if record is None:
                    break
                if damaged_from is not None:
                    left_out.append(f"{damaged_from}-{offset}")
                    damaged_from = None
                out.write(whole[record.start:record.end])
                kept, offset = kept + 1, record.end
            if damaged_from is not None:
                left_out.append(f"{damaged_from}-{len(whole)}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.path, aside)
        os.replace(fresh, self.path)
        return (f"kept {kept} intact records in {self.path}, left out bytes {', '.join(left_out) or 'none'}; "
                f"the journal as it was is {aside}")


class Journaled:
    """WSGI middleware: a change reaches the app only once it is in the journal."""

    def __init__(self, app: WsgiApp, journal: Journal):
        self.app, self.journal = app, journal

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in CHANGES:
            return self.app(environ, start_response)
        body = get_input_stream(environ).read()
        fields = {name: value for name, value in environ.items()  # the body is whole now: no chunked transfer
                  if isinstance(value, str) and name not in ("HTTP_TRANSFER_ENCODING", "CONTENT_LENGTH")}
        with self.journal.lock:
            status, headers, content = self._change(fields, body)
        start_response(status, [(k, v) for k, v in headers if k.lower() != "content-length"]
                       + [("Content-Length", str(len(content)))])
        return [content]

    def _change(self, fields: dict[str, str], body: bytes) -> Answer:
        """Journal the change, then apply it; a change moto refuses (or fails on) is marked refused."""
        try:
            if _creates_upload(fields):
                return self._create_upload(fields, body)
            digest = self.journal.append_change(fields, body)
        except OSError as exc:
            return _not_stored(exc)
        answer: Answer | None = None
        try:
            answer = call(self.app, fields, body)
        finally:
            if answer is None or not answer[0].startswith("2"):
                with suppress(OSError):  # unmarked, it is replayed and refused again
                    self.journal.append_refusal(digest)
        return answer

    def _create_upload(self, fields: dict[str, str], body: bytes) -> Answer:
        """A CreateMultipartUpload, which makes no object: applied first, for the upload id moto gives,
        then journalled with it; aborted if the journal write fails."""
        answer = call(self.app, fields, body)
        if answer[0].startswith("2"):
            upload_id = _upload_id(answer[2])
            try:
                self.journal.append_change(fields, body, upload_id)
            except OSError:
                call(self.app, {**fields, "REQUEST_METHOD": "DELETE",
                                "QUERY_STRING": urlencode({"uploadId": upload_id or ""})}, b"")
                raise
        return answer


def _not_stored(exc: OSError) -> Answer:
    """The answer to a change the journal could not take: 507 for a full disk, else 500."""
    status, code = ("507 Insufficient Storage", "InsufficientStorage") if exc.errno in STORAGE_FULL \
        else ("500 Internal Server Error", "InternalError")
    message = f"nothing was stored: the S3 server's journal could not be written ({exc.strerror or exc})"
    return status, [("Content-Type", "application/xml")], _error_xml(code, message)


def main(argv: list[str]) -> None:
    """Replay the journal into a fresh moto, then serve S3 on ``host:port`` until stopped; or repair a journal."""
    if len(argv) == 2 and argv[0] == "repair":
        print(Journal(Path(argv[1])).repair())
        return
    if len(argv) != 3 or not argv[1].isdigit():
        raise SystemExit("usage: python -m pipelines.s3server HOST PORT JOURNAL | repair JOURNAL")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # heavy: only to serve

    host, port, journal_path = argv
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit fails the write (EFBIG), like a full disk
    moto = DomainDispatcherApplication(create_backend_app)
    journal = Journal(Path(journal_path))
    started = time.monotonic()
    applied = journal.replay(moto)
    print(f"replayed {applied} changes from {journal_path} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    app = SignedOnly(Journaled(moto, journal), os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    run_simple(host, int(port), app, threaded=True, request_handler=RedactingRequestHandler)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (JournalDamaged, OSError) as error:
        raise SystemExit(f"error: {error}") from None
