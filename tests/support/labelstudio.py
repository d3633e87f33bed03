"""A real Label Studio server for tests, started from its own virtual environment as teams run it.

Set-up (once): ``python3 -m venv .venv-labelstudio && .venv-labelstudio/bin/pip install -c constraints-labelstudio.txt label-studio==1.23.2``
(or point ``$SIAMESE_LABEL_STUDIO`` at a ``label-studio`` executable). Without it the tests that need it skip. Its
first start migrates its database (about a minute).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.http import HOST, free_port, stop_group
from support.project import REPO

TOKEN = "siamese-review-token-0123456789"


def label_studio_executable() -> str:
    """The ``label-studio`` program; the test skips, saying how to install it, where there is none."""
    found = os.environ.get("SIAMESE_LABEL_STUDIO") or str(REPO / ".venv-labelstudio" / "bin" / "label-studio")
    if not Path(found).is_file():
        pytest.skip("Label Studio is not installed: python3 -m venv .venv-labelstudio && "
                    ".venv-labelstudio/bin/pip install -c constraints-labelstudio.txt label-studio==1.23.2")
    return found


@contextmanager
def running_label_studio(folder: Path) -> Iterator[str]:
    """A Label Studio server on a loopback port, its data under ``folder``, with a user whose API token is
    :data:`TOKEN`; its URL."""
    executable, port = label_studio_executable(), free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(folder / "ls-data"), "DJANGO_DB": "sqlite"}
    with open(folder / "label-studio.log", "wb") as log:
        server = subprocess.Popen(
            [executable, "start", "--no-browser", "--host", HOST, "--port", str(port), "--data-dir",
             str(folder / "ls-data"), "--username", "reviewer@example.com", "--password", "review-pass-123",
             "--user-token", TOKEN, "--enable-legacy-api-token"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert server.poll() is None, (folder / "label-studio.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (folder / "label-studio.log").read_text()[-3000:]
                time.sleep(2)
        yield url
    finally:
        stop_group(server)
