"""The stack's S3 server: moto's, behind a check that every request is signed with the stack's key.

``python -m pipelines.s3server HOST PORT`` reads the key from ``$AWS_ACCESS_KEY_ID`` and
``$AWS_SECRET_ACCESS_KEY`` (never from the command line). Each request must carry an AWS
Signature Version 4 made with that key, in its ``Authorization`` header (SDK calls) or in its
query string (the presigned URLs the MLflow server hands out for downloads), and a presigned URL
must not have expired; anything else gets 403. moto's admin API (``/moto-api``: reset, state)
answers 404. moto itself runs without authentication: it does not check presigned URLs.

The signature covers the method, path, query, the signed headers and the payload hash the client
declares; as with any SigV4 check on a plain-HTTP loopback port, the body is not re-hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

ALGORITHM = "AWS4-HMAC-SHA256"


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


def main(host: str, port: int) -> None:
    """Serve S3 on ``host:port`` until stopped."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    app = SignedOnly(DomainDispatcherApplication(create_backend_app), os.environ["AWS_ACCESS_KEY_ID"],
                     os.environ["AWS_SECRET_ACCESS_KEY"])
    run_simple(host, port, app, threaded=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
