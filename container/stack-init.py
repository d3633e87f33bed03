#!/usr/bin/env python3
"""A compose service's start: wait for the services it needs, set up what it relies on, then run its command.

    stack-init.py [--wait HOST:PORT]... [--bucket NAME] [--work-pool NAME] [--champion MODEL] -- COMMAND...

--bucket makes the S3 bucket if missing (with $MLFLOW_S3_ENDPOINT_URL and the AWS keys); --work-pool makes
a Prefect process work pool if missing; --champion waits until the registry's alias (models:/NAME@alias)
names a version, so a replica starts once there is a model to serve. Compose's depends_on only orders
starts, in both docker compose and podman-compose: this waits until the services answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

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


def ensure_work_pool(name: str) -> None:
    while subprocess.run(["prefect", "work-pool", "inspect", name], capture_output=True).returncode != 0:
        done = subprocess.run(["prefect", "work-pool", "create", name, "--type", "process"], capture_output=True)
        if done.returncode == 0:
            say(f"made work pool {name}")
            return
        time.sleep(POLL_S)


def wait_for_champion(model: str) -> None:
    import mlflow  # lazy: only the replicas wait on the registry

    name, alias = model.removeprefix("models:/").split("@", 1)
    client, told = mlflow.MlflowClient(), False
    while True:
        try:
            client.get_model_version_by_alias(name, alias)
            return
        except Exception:  # not registered yet, or the tracking server not up yet: both mean wait
            if not told:
                say(f"waiting for {model} (run the pipeline against the stack: dvc repro)")
                told = True
            time.sleep(5 * POLL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--bucket")
    parser.add_argument("--work-pool")
    parser.add_argument("--champion", metavar="MODEL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    for address in args.wait:
        wait_for(address)
    if args.bucket:
        ensure_bucket(args.bucket)
    if args.work_pool:
        ensure_work_pool(args.work_pool)
    if args.champion and args.champion.startswith("models:/") and "@" in args.champion:
        wait_for_champion(args.champion)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
