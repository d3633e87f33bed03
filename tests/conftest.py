"""Test session setup: quiet TensorFlow, a private Prefect home, one Prefect test server, tiny params."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Prefect reads its settings when it is first imported, so these come first.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="prefect-home-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
import yaml

from support.tiny import TINY_PARAMS

REPO = Path(__file__).resolve().parents[1]



def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def write_params():
    """A function writing the repository's params.yaml with the tiny settings and ``{dotted key: value}`` overrides."""

    def write(path: Path, overrides: dict | None = None) -> Path:
        data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        for key, value in {**TINY_PARAMS, **(overrides or {})}.items():
            section, name = key.split(".")
            data[section][name] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
