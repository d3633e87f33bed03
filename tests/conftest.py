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
from tiny import TINY_NETWORK

REPO = Path(__file__).resolve().parents[1]

# The smallest run that still goes through every stage: 1 epoch on the demo data cut down by TINY_DATA.
TINY_DATA = {"classes": 6, "per_class": 5}  # 6 known classes (4 train, 1 test image) and 6 held-out (5 images)
TINY_PARAMS = {
    **{f"model.{key}": value for key, value in TINY_NETWORK.items()},
    "train.classes_per_batch": 6,
    "train.images_per_class": 4,
    "evaluate.fewshot_episodes": 20,
    "triplets.max_pairs_per_class": 10,
    "train.epochs": 1,
    "train.batch_size": 16,
    "evaluate.top_k": 3,
    # one epoch of the tiny network need not beat its baselines: these runs test the pipeline's mechanics, and
    # the tests of the baseline gate set the margin back to 0
    "evaluate.baseline_margin": -1.0,
}


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


def write_tiny_demo_data(project: Path) -> Path:
    """The demo dataset, cut down by TINY_DATA, at the params' default place under ``project``."""
    from pipelines.demo_data import write_demo_data

    root = project / "data" / "demo"
    write_demo_data(root, **TINY_DATA)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
