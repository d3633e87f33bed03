#!/usr/bin/env python3
"""Write the team stack's credentials for container/compose.yaml: random passwords and keys, made once.

    python3 container/make-env.py            # -> container/.env (0600), read by `docker compose` / `podman-compose`
    python3 container/make-env.py --client   # the host's exports to use the stack (dvc repro, siamese promote)

An existing .env is kept (its passwords are already in the PostgreSQL volume); --force replaces it, which
only works with new volumes (`compose down -v`). The file is listed in container/.gitignore and .dockerignore.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent / ".env"
SECRETS = ("POSTGRES_ADMIN_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "AWS_SECRET_ACCESS_KEY",
           "SIAMESE_ROLLOUT_KEY")


def read(path: Path) -> dict[str, str]:
    """The KEY=value lines of an env file."""
    lines = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in lines}


def client_exports(env: dict[str, str]) -> str:
    """What a user on the host exports to run the pipeline against the stack's published (loopback) ports: a
    port set in the environment or in the env file (where compose reads it too), else the default."""
    ports = {name: os.environ.get(name, env.get(name, default)) for name, default in
             (("SIAMESE_MLFLOW_PORT", "5000"), ("SIAMESE_PREFECT_PORT", "4200"), ("SIAMESE_S3_PORT", "9000"))}
    client = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['SIAMESE_MLFLOW_PORT']}",
              "PREFECT_API_URL": f"http://127.0.0.1:{ports['SIAMESE_PREFECT_PORT']}/api",
              "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['SIAMESE_S3_PORT']}",
              "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
              "AWS_DEFAULT_REGION": "us-east-1", "SIAMESE_ROLLOUT_KEY": env["SIAMESE_ROLLOUT_KEY"],
              # MLflow hands a client presigned S3 links for downloads; in the stack they name the compose
              # network's s3:9000, which the host cannot resolve: stream the artifacts through MLflow instead
              "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in client.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace an existing .env (new volumes only)")
    parser.add_argument("--client", action="store_true", help="print the host's exports for the stack")
    parser.add_argument("--file", type=Path, default=ENV_FILE, help="where the env file is (default: %(default)s)")
    args = parser.parse_args()
    if args.client:
        if not args.file.exists():
            sys.exit(f"make-env.py: {args.file} does not exist: run container/make-env.py first")
        sys.stdout.write(client_exports(read(args.file)))
        return
    if args.file.exists() and not args.force:
        print(f"{args.file} exists; kept (its passwords are in the stack's volumes)")
        return
    values = {"AWS_ACCESS_KEY_ID": "siamese-stack", **{name: secrets.token_urlsafe(24) for name in SECRETS}}
    text = "# The team stack's credentials (container/make-env.py). Keep private; never commit or copy into an image.\n"
    text += "".join(f"{key}={value}\n" for key, value in values.items())
    tmp = args.file.with_name(args.file.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(args.file)
    print(f"wrote {args.file} (mode 600)")


if __name__ == "__main__":
    main()
