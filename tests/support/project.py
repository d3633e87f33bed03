"""Projects as users have them: the tiny demo data, and a git + DVC clone of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support.tiny import TINY_DATA

REPO = Path(__file__).resolve().parents[2]


def write_tiny_demo_data(project: Path) -> Path:
    """The demo dataset, cut down by TINY_DATA, at the params' default place under ``project``."""
    from pipelines.demo_data import write_demo_data

    root = project / "data" / "demo"
    write_demo_data(root, **TINY_DATA)
    return root


def dvc_env(tmp_path: Path) -> dict[str, str]:
    """The environment DVC runs in: this Python's tools first, the project's MLflow store, a git identity."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def dvc_project(tmp_path: Path, write_params, env: dict | None = None):
    """A git + DVC repository as a user's clone: the code, dvc.yaml, .dvc/config (with its local remote),
    tiny params and the tiny demo data `dvc add`ed and committed. Returns (repo, run, dvc)."""
    repo, env = tmp_path / "repo", {**dvc_env(tmp_path), **(env or {})}
    repo.mkdir()
    for folder in ("pipelines", "siamese_core"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo)
    write_params(repo / "params.yaml")
    write_tiny_demo_data(repo)

    def run(*args: str, check: bool = True) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
        output = done.stdout + done.stderr
        assert not check or done.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
        return output

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    for name in (".dvcignore", ".dvc/config"):
        shutil.copy(REPO / name, repo / name)
    run(*dvc, "add", "-q", "data/demo")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline and data")
    return repo, run, dvc
