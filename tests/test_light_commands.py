"""Commands that only read or write the registry, the review queue or the training folder load no TensorFlow."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.supervisor import port_free

from support.http import free_port
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

MODEL = "tiny-recognizer"


@pytest.fixture(scope="module")
def registry_of_two(tmp_path_factory):
    """A SQLite store holding two versions of the tiny model; its URI."""
    root = tmp_path_factory.mktemp("light")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = use_sqlite_store(monkeypatch, root)
        bundle = make_tiny_bundle(root)
        for top1 in (0.5, 0.7):
            register_bundle(pipeline_params(MODEL), bundle.path, {"top1": top1}, bundle.history, [], {},
                            score_champion=logged_scorer())
    return uri, root


def test_registry_review_and_feedback_commands_do_not_import_tensorflow(registry_of_two, tmp_path):
    uri, root = registry_of_two
    labelled = tmp_path / "labelled" / "digit 9"
    labelled.mkdir(parents=True)
    (tmp_path / "train").mkdir()
    commands = [
        ["rollback", MODEL, "--reason", "check"],
        ["promote", MODEL, "2", "--reason", "check"],
        ["rollout", "status", MODEL],
        ["registry", "repair", MODEL],
        ["registry", "sign", MODEL, "1"],
        ["review", "pull", "--label-studio", "http://127.0.0.1:9"],
        ["feedback", "import", str(tmp_path / "labelled"), "--into", str(tmp_path / "train"), "--no-dvc"],
    ]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from pipelines.cli import app\n"
        f"for args in {commands!r}:\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert 'Traceback' not in result.output, (args, result.output)\n"
        "    assert 'tensorflow' not in sys.modules, f'{args} loaded TensorFlow'\n"
        "    print(args[0], result.exit_code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=root,
                          env={"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = dict(line.split() for line in done.stdout.splitlines())
    assert statuses["rollback"] == statuses["promote"] == statuses["rollout"] == "0", done.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_siamese_ui_stops_its_mlflow_server_with_it(registry_of_two, tmp_path, stop_signal):
    """SIGTERM (a supervisor) or Ctrl-C stops `siamese ui` and the MLflow server and worker it started: the port
    is free again. The UI loads no TensorFlow and starts none of MLflow's GenAI job consumers."""
    uri, _ = registry_of_two
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([str(Path(sys.executable).parent / "siamese"), "ui", "--port", str(port)], cwd=tmp_path,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while port_free(port):
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        started = psutil.Process(ui.pid)
        assert not any("tensorflow" in mapped.path for mapped in started.memory_maps())
        commands = [" ".join(child.cmdline()) for child in started.children(recursive=True)]
        assert not any("huey" in command or "_job_runner" in command for command in commands), commands
        ui.send_signal(stop_signal)
        ui.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not port_free(port):
            time.sleep(0.5)
        assert port_free(port), f"port {port} still served after siamese ui stopped:\n{log.read_text()[-2000:]}"
        assert "MLflow UI stopped" in log.read_text()
    finally:
        ui.kill()
