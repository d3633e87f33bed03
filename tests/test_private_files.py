"""What the product writes for itself is private to its owner unless the user opens it: the embedded MLflow store."""

from __future__ import annotations

import os
import stat

import mlflow

from pipelines import tracking


def test_the_embedded_store_is_created_0600_and_a_mode_the_user_chose_is_kept(monkeypatch, tmp_path):
    """mlflow.db, made by the project's first use of the store, is 0600 whatever the umask; a database the user
    made readable to others stays so."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = os.umask(0o022)
    try:
        for folder, mode in ((tmp_path / "new", None), (tmp_path / "opened", 0o644)):
            folder.mkdir()
            monkeypatch.chdir(folder)
            if mode is not None:
                (folder / "mlflow.db").touch(mode)
            tracking.ensure_experiment("private")
            assert tracking.client().get_experiment_by_name("private") is not None
            assert stat.S_IMODE((folder / "mlflow.db").stat().st_mode) == (mode or 0o600), folder
    finally:
        os.umask(previous)
        mlflow.set_tracking_uri(None)
