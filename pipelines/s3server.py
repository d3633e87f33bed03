"""The stack's S3 server: moto's, behind a check that every request is signed with the stack's key, with
every change kept in a journal file.

``python -m pipelines.s3server HOST PORT JOURNAL`` reads the key from ``$AWS_ACCESS_KEY_ID`` and
``$AWS_SECRET_ACCESS_KEY`` (never from the command line). Each request must carry an AWS
Signature Version 4 made with that key, in its ``Authorization`` header (SDK calls) or in its
query string (the presigned URLs the MLflow server hands out for downloads), and a presigned URL
must not have expired; anything else gets 403. moto's admin API (``/moto-api``: reset, state)
answers 404. moto itself runs without authentication: it does not check presigned URLs.

The signature covers the method, path, query, the signed headers and the payload hash the client
declares; as with any SigV4 check on a plain-HTTP loopback port, the body is not re-hashed.

moto keeps the bucket in memory. So every request that may change it (PUT, POST, DELETE) and that
moto answers with success is appended to the journal, and the file synced to disk, before the client
gets the answer; when the server starts it replays the journal into moto. What a client was told
is stored therefore outlives a crash or ``kill -9`` of the server. A record cut short by a crash
(its client never got an answer) is dropped. The journal only grows: it holds every version of
every object written, deleted ones too.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

ALGORITHM = "AWS4-HMAC-SHA256"
CHANGES = ("PUT", "POST", "DELETE")  # the methods of the requests that may change the bucket

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


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


def refusal(environ: dict, access_key_id: str, secret: str, now: float | None = None) -> str | None:
    """Why a request is refused, or None when it is signed with the stack's key."""
    query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    fields = dict(query)
    if "X-Amz-Signature" in fields:  # a presigned URL
        if fields.get("X-Amz-Algorithm") != ALGORITHM:
            return "unsupported signature algorithm"
        credential, amz_date = fields.get("X-Amz-Credential", ""), fields.get("X-Amz-Date", "")
        signed_headers, given = fields.get("X-Amz-SignedHeaders", ""), fields["X-Amz-Signature"]
        try:
            issued = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
            expired = (now or time.time()) > issued + int(fields.get("X-Amz-Expires", "0"))
        except ValueError:
            return "malformed X-Amz-Date or X-Amz-Expires"
        if expired:
            return "the presigned URL has expired"
        query = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        payload_hash = "UNSIGNED-PAYLOAD"
    else:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if not authorization.startswith(ALGORITHM + " "):
            return "requests must be signed (AWS Signature Version 4)"
        parts = dict(p.strip().split("=", 1) for p in authorization[len(ALGORITHM):].split(",") if "=" in p)
        credential, signed_headers, given = parts.get("Credential", ""), parts.get("SignedHeaders", ""), \
            parts.get("Signature", "")
        amz_date, payload_hash = _header(environ, "x-amz-date"), _header(environ, "x-amz-content-sha256")
    key_id, _, scope = credential.partition("/")
    if not hmac.compare_digest(key_id, access_key_id):
        return "unknown access key"
    expected = _signature(environ, secret, query, signed_headers, payload_hash or "UNSIGNED-PAYLOAD", amz_date, scope)
    return None if hmac.compare_digest(expected, given) else "the signature does not match"


class SignedOnly:
    """WSGI middleware: 404 for moto's admin API, 403 for a request not signed with the key, else moto."""

    def __init__(self, app, access_key_id: str, secret: str):
        self.app, self.access_key_id, self.secret = app, access_key_id, secret

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        problem = refusal(environ, self.access_key_id, self.secret)
        if problem:
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [f"<Error><Code>AccessDenied</Code><Message>{problem}</Message></Error>".encode()]
        return self.app(environ, start_response)


def call(app: WsgiApp, fields: dict[str, str], body: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
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


class Journal:
    """The changes moto accepted, in order, in an append-only file: per change one JSON line (the
    request's environ fields, the body's length, and for CreateMultipartUpload the upload id moto
    gave), then the body."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # one change at a time: moto applies them in the journal's order

    def append(self, fields: dict[str, str], body: bytes, content: bytes) -> None:
        """Add one accepted change and sync the file to disk; on a failure the file is left as it was."""
        record: dict[str, Any] = {"fields": fields, "body": len(body)}
        if fields["REQUEST_METHOD"] == "POST" and "uploads" in dict(parse_qsl(fields.get("QUERY_STRING", ""),
                                                                              keep_blank_values=True)):
            record["upload_id"] = _upload_id(content)
        data = memoryview(json.dumps(record).encode() + b"\n" + body)
        created = not self.path.exists()
        journal = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            end = os.lseek(journal, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(journal, data):]
                os.fsync(journal)
            except OSError:  # a disk full: no half record for the next ones to follow
                os.ftruncate(journal, end)
                raise
        finally:
            os.close(journal)
        if created:  # the new file's name must outlive a crash too
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def replay(self, app: WsgiApp) -> int:
        """Apply every change in the journal to ``app`` (a fresh moto); the number applied. A last
        record cut short by a crash is cut off the file."""
        if not self.path.exists():
            return 0
        uploads: dict[str, str] = {}  # the upload ids of the journal -> those of this moto
        applied = 0
        with open(self.path, "rb+") as journal:
            while True:
                start = journal.tell()
                line = journal.readline()
                try:
                    record = json.loads(line)
                    body = journal.read(record["body"])
                    complete = len(body) == record["body"]
                except ValueError:
                    complete = False
                if not complete:
                    if line:
                        print(f"journal {self.path}: dropped an incomplete last record at byte {start}",
                              file=sys.stderr)
                        journal.truncate(start)
                    return applied
                fields = record["fields"]
                query = parse_qsl(fields.get("QUERY_STRING", ""), keep_blank_values=True)
                if any(name == "uploadId" for name, _ in query):
                    fields = {**fields, "QUERY_STRING": urlencode(
                        [(name, uploads.get(value, value) if name == "uploadId" else value) for name, value in query])}
                status, _, content = call(app, fields, body)
                if not status.startswith("2"):
                    print(f"journal {self.path}: replaying {fields['REQUEST_METHOD']} {fields.get('PATH_INFO')} "
                          f"answered {status}", file=sys.stderr)
                if record.get("upload_id"):
                    uploads[record["upload_id"]] = _upload_id(content) or record["upload_id"]
                applied += 1


class Journaled:
    """WSGI middleware: a change the app accepts is in the journal before its client hears of it."""

    def __init__(self, app: WsgiApp, journal: Journal):
        self.app, self.journal = app, journal

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in CHANGES:
            return self.app(environ, start_response)
        from werkzeug.wsgi import get_input_stream

        body = get_input_stream(environ).read()
        fields = {name: value for name, value in environ.items()  # the body is whole now: no chunked transfer
                  if isinstance(value, str) and name not in ("HTTP_TRANSFER_ENCODING", "CONTENT_LENGTH")}
        with self.journal.lock:
            status, headers, content = call(self.app, fields, body)
            if status.startswith("2"):
                try:
                    self.journal.append(fields, body, content)
                except OSError as exc:  # not kept, so not a success
                    status, headers = "500 Internal Server Error", [("Content-Type", "application/xml")]
                    content = f"<Error><Code>InternalError</Code><Message>journal: {exc}</Message></Error>".encode()
        start_response(status, [(k, v) for k, v in headers if k.lower() != "content-length"]
                       + [("Content-Length", str(len(content)))])
        return [content]


def main(host: str, port: int, journal_path: str) -> None:
    """Replay the journal into a fresh moto, then serve S3 on ``host:port`` until stopped."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    moto = DomainDispatcherApplication(create_backend_app)
    journal = Journal(Path(journal_path))
    started = time.monotonic()
    applied = journal.replay(moto)
    print(f"replayed {applied} changes from {journal_path} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    app = SignedOnly(Journaled(moto, journal), os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    run_simple(host, port, app, threaded=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
