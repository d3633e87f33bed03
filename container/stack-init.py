#!/usr/bin/env python3
"""A compose service's start: wait for the services it needs, set up what it relies on, then run its command.

    stack-init.py [--wait HOST:PORT]... [--bucket NAME] [--champion MODEL] -- COMMAND...

--bucket makes the S3 bucket if missing (with $MLFLOW_S3_ENDPOINT_URL and the AWS keys); --champion waits
until the registry's alias (models:/NAME@alias) names a version, asking $MLFLOW_TRACKING_URI's REST API (no
MLflow import), so a replica starts once there is a model to serve. Compose's depends_on only orders starts,
in both docker compose and podman-compose: this waits until the services answer. It stops at once on SIGTERM
while it waits (as a container's first process, it would otherwise ignore the signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

POLL_S = 2.0


def say(message: str) -> None:
    print(f"stack-init: {message}", file=sys.stderr, flush=True)


def wait_for(address: str) -> None:
    host, port = address.rsplit(":", 1)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            return
        except OSError:
            time.sleep(POLL_S)


def ensure_bucket(name: str) -> None:
    import boto3  # lazy: only the services that need the bucket pay its import
    import botocore.exceptions

    client = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    while True:
        try:
            client.head_bucket(Bucket=name)
            return
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                client.create_bucket(Bucket=name)
                say(f"made bucket {name}")
                return
            raise
        except botocore.exceptions.EndpointConnectionError:
            time.sleep(POLL_S)


def status(url: str) -> int:
    """The HTTP status a GET gets; 0 when the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_for_champion(model: str) -> None:
    name, alias = model.removeprefix("models:/").split("@", 1)
    query = urllib.parse.urlencode({"name": name, "alias": alias})
    url = f"{os.environ['MLFLOW_TRACKING_URI'].rstrip('/')}/api/2.0/mlflow/registered-models/alias?{query}"
    told = False
    while status(url) != 200:  # not registered yet, or the tracking server not up yet: both mean wait
        if not told:
            say(f"waiting for {model} (run the pipeline against the stack: dvc repro)")
            told = True
        time.sleep(POLL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--bucket")
    parser.add_argument("--champion", metavar="MODEL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for address in args.wait:
        wait_for(address)
    if args.bucket:
        ensure_bucket(args.bucket)
    if args.champion and args.champion.startswith("models:/") and "@" in args.champion:
        wait_for_champion(args.champion)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
