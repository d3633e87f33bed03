"""The champion gate across machines: two processes that share no lock folder, only the servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import registry, tracking
from pipelines.gate import CHALLENGER, CHAMPION, REJECTED, Scores, decide

from support.models import logged_scorer

REPO = Path(__file__).resolve().parents[1]
NAME = "race"

# A registration's gate in its own process, held between reading the champion (under the lock) and moving the
# alias until the test creates <signals>/go. With "unlocked", the gate runs with no lock at all. The champion is
# scored before the lock is taken; the decision, under it, is where a gate is held.
GATE = """
import sys, time
from pathlib import Path
from contextlib import nullcontext
from mlflow import MlflowClient
from pipelines import registry
from support.models import logged_scorer

run_id, version, value, signals, hold, mode = sys.argv[1:]
decide = registry.decide

def held(*args):
    Path(signals, f"{version}.read").touch()
    while hold == "hold" and not Path(signals, "go").exists():
        time.sleep(0.05)
    return decide(*args)

registry.decide = held
if mode == "unlocked":
    registry.gate_lock = lambda name: nullcontext()
print(registry.apply_gate(MlflowClient(), run_id, "race", version, "top1", float(value), True, logged_scorer())[0])
"""


def _versions(client: MlflowClient, values: list[float]) -> dict[float, tuple[str, str]]:
    experiment = tracking.ensure_experiment(NAME)
    client.create_registered_model(NAME)
    made = {}
    for value in values:
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "top1", value)
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id).version
        made[value] = (run.info.run_id, str(version))
    return made


def _race(tmp_path: Path, env: dict, made: dict, mode: str) -> str:
    """The 0.8 registration reads the 0.7 champion and is held; the 0.95 one starts meanwhile; returns the champion."""
    signals = tmp_path / f"signals-{mode}"
    signals.mkdir()

    def start(value: float, hold: str, machine: str):
        run_id, version = made[value]
        machine_tmp = tmp_path / machine  # each "machine" has its own temp folder: no lock file is shared
        machine_tmp.mkdir(exist_ok=True)
        return subprocess.Popen(
            [sys.executable, "-c", GATE, run_id, version, str(value), str(signals), hold, mode],
            env={**env, "TMPDIR": str(machine_tmp)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start(0.8, "hold", "machine-a")
    deadline = time.monotonic() + 120
    while not (signals / f"{made[0.8][1]}.read").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.1)
    second = start(0.95, "go", "machine-b")
    if mode == "unlocked":  # nothing holds it: it finishes while the first is held, however slow the machine
        second.wait(timeout=120)
    else:  # it waits on the lock meanwhile
        time.sleep(4)
    second_read_while_first_held = (signals / f"{made[0.95][1]}.read").exists()
    (signals / "go").touch()
    for process in (first, second):
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 0, output[-3000:]
    if mode == "locked":
        assert not second_read_while_first_held, "the second gate read the champion while the first held the lock"
    return str(MlflowClient().get_registered_model(NAME).aliases["champion"])


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
def test_two_machines_both_beating_the_champion_leave_the_better_one(tmp_path, monkeypatch, prefect_server, mode):
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    made = _versions(client, [0.7, 0.8, 0.95])
    registry.apply_gate(client, made[0.7][0], NAME, made[0.7][1], "top1", 0.7, True, logged_scorer())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    champion = _race(tmp_path, env, made, mode)
    if mode == "locked":  # through the Prefect server's concurrency limit: the second gate waits, then beats 0.8
        assert champion == made[0.95][1]
        assert client.get_registered_model(NAME).aliases["previous"] == int(made[0.8][1])
    else:  # the same interleaving with no shared lock: both read 0.7, the worse one writes last and wins
        assert champion == made[0.8][1]


def test_two_gates_that_both_find_no_concurrency_limit_both_take_the_lock(prefect_server, monkeypatch):
    """Prefect's upsert reads, then creates: the second of two gates started together finds no limit, and its create
    then meets the first one's. That gate goes on under the limit the other made (the race the two-flows test hit)."""
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.exceptions import ObjectNotFound

    def limits() -> list[tuple[str, int]]:
        with get_client(sync_client=True) as prefect:
            return sorted((limit.name, limit.limit) for limit in prefect.read_global_concurrency_limits(limit=200))

    before = limits()
    with registry.gate_lock("raced model"):  # the first gate: it creates the limit
        pass
    made = sorted(set(limits()) - set(before))
    assert len(made) == 1 and made[0][1] == 1

    def not_yet_seen(self, name):
        raise ObjectNotFound(http_exc=RuntimeError(f"{name} read before the other gate created it"))

    monkeypatch.setattr(SyncPrefectClient, "read_global_concurrency_limit_by_name", not_yet_seen)
    with registry.gate_lock("raced model"):  # the second: its create answers 409
        pass
    monkeypatch.undo()
    assert sorted(set(limits()) - set(before)) == made


def test_the_gate_decides_from_the_figures_alone():
    """The decision is a pure function: no registry, no model."""
    passed = {"passed": True}
    assert decide(None, 0.5, None, "top1", True, passed).decision == CHAMPION  # the first version, in every mode
    assert decide(None, 0.5, None, "top1", True, passed, "shadow").decision == CHAMPION
    failed = decide("1", 0.9, Scores(0.1), "top1", True, {"passed": False, "sentence": "no"}, "canary")
    assert (failed.decision, failed.reason) == (REJECTED, "no")
    assert decide("1", 0.9, Scores(0.1), "top1", True, passed).decision == CHAMPION
    assert decide("1", 0.9, Scores(0.1), "top1", True, passed, "shadow").decision == CHALLENGER
    assert decide("1", 0.1, Scores(0.1), "top1", True, passed).decision == CHALLENGER  # a tie does not win
    assert decide("1", 0.1, Scores(0.9), "top1", False, passed, "canary").decision == CHALLENGER  # lower is better
    grown = decide("1", 0.2, Scores(0.5, 0.8, added=("digit 3",)), "top1", True, passed, "shadow")
    assert grown.decision == CHALLENGER and grown.previous == 0.5  # its figure on the shared queries decides
    assert "0.8000 against champion version 1's 0.5000" in grown.reason and "it adds digit 3" in grown.reason
    assert decide("1", 0.9, Scores(0.5, 0.3), "top1", True, passed, "shadow").decision == REJECTED
    assert decide("1", 0.9, None, "top1", True, passed).decision == CHAMPION  # another data set, direct: replaced
    unrelated = decide("1", 0.9, None, "top1", True, passed, "shadow")
    assert unrelated.decision == CHALLENGER and unrelated.previous is None and "another data set" in unrelated.reason
