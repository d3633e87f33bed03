"""The stack's S3 server: moto's, answering only requests signed with the stack's key.

``python -m pipelines.s3server HOST PORT`` reads the key from ``$AWS_ACCESS_KEY_ID`` and
``$AWS_SECRET_ACCESS_KEY`` (never from the command line). moto's authentication is on from the
first request (``INITIAL_NO_AUTH_ACTION_COUNT=0``): an unsigned request, an unknown key or a wrong
signature gets 403. The key belongs to an IAM user whose only policy is S3 on the stack's bucket.
moto's admin API (``/moto-api``: reset, state, seeding) answers 404.
"""

from __future__ import annotations

import json
import os
import sys

USER = "siamese-stack"


def _policy(bucket: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]})


def _install_key(access_key_id: str, secret: str, bucket: str) -> None:
    """The stack's key, as an access key of an IAM user allowed S3 on ``bucket`` only."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_user("us-east-1", USER)
    backend.put_user_policy(USER, "stack-bucket", _policy(bucket))
    key = backend.create_access_key(USER)
    del backend.access_keys[key.physical_resource_id]
    key.access_key_id, key.secret_access_key = access_key_id, secret
    backend.access_keys[key.physical_resource_id] = key


class _SignedOnly:
    """WSGI middleware: 404 for moto's admin API, 403 for a request with no signature (moto's own check
    would fail on it with a 500), everything else to moto, which checks the signature."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if "HTTP_AUTHORIZATION" not in environ and "X-Amz-Signature=" not in environ.get("QUERY_STRING", ""):
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>requests must be signed</Message></Error>"]
        return self.app(environ, start_response)


def main(host: str, port: int, bucket: str) -> None:
    """Serve S3 on ``host:port`` until stopped."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read when moto is imported
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    _install_key(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], bucket)
    run_simple(host, port, _SignedOnly(DomainDispatcherApplication(create_backend_app)), threaded=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
