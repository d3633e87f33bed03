"""siamese tune: a real Optuna study over tiny trials, each a nested run of a real MLflow store on SQLite."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines import tuning
from pipelines.cli import app
from pipelines.flows import tuning_flow
from pipelines.params import PipelineParams, load_params, preset_keys
from pipelines.trial_process import noting_interrupts, raise_if_interrupted
from pipelines.tuning import (
    COMPARED_PRESETS,
    SEARCH_SPACE,
    base_params,
    choose_winner,
    free_space,
    preset_point,
    pruned,
    score,
    space_table,
    split_folder,
    trial_params,
    tune,
)
from siamese_core.data import scan_folder
from siamese_core.errors import ConfigError
from siamese_core.metrics import flatten
from tests.support.images import make_digits_dataset
from tests.support.tiny import TINY_NETWORK

# The tiny network for 2 epochs, one view: the search keeps pooling, mining, margin, learning rate, schedule,
# augmentation and matching.
PINS = {**{f"model.{key}": value for key, value in TINY_NETWORK.items()}, "train.epochs": 2,
        "train.classes_per_batch": 6, "evaluate.test_time_views": 1}


def pin_options(**changes) -> list[str]:
    """PINS (with ``changes``) as ``siamese tune --set`` options."""
    return [part for key, value in {**PINS, **changes}.items() for part in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("digits"), classes=8, train_per_class=8, test_per_class=2)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh MLflow store and study storage, the study's workspace in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SIAMESE_TUNING_STORAGE", raising=False)
    return tmp_path


def test_every_compared_preset_is_a_point_of_the_search_space():
    base = base_params(None)
    for name in COMPARED_PRESETS:
        point = preset_point(name, base, SEARCH_SPACE)
        assert point is not None, name
        trained = flatten(trial_params(base, point, {}).model_dump())
        assert {key: trained[key] for key in preset_keys(name)} == preset_keys(name)
    assert "`network`" in space_table() and "efficientnet_lite0" in space_table()


def test_a_pinned_key_leaves_the_search_and_wins():
    space = free_space({"model.input_size": 40, "train.epochs": 3})
    assert {d.name for d in space}.isdisjoint({"network", "train.epochs"})
    params = trial_params(base_params(None), preset_point("fast-cpu", base_params(None), space),
                          {"model.input_size": 40, "train.epochs": 3}, preset="fast-cpu")
    assert (params.model.input_size, params.train.epochs, params.model.pooling) == (40, 3, "gem")


def test_the_split_validates_on_classes_and_images_training_never_sees(digits):
    folder = scan_folder(digits[0])
    split = split_folder(folder, seed=42)
    trained = {p for paths in split["train"].values() for p in paths}
    assert set(split["unseen"]).isdisjoint(split["train"]) and len(split["unseen"]) == 2
    assert set(split["known"]) <= set(split["train"])
    assert trained.isdisjoint(p for paths in split["known"].values() for p in paths)
    assert split == split_folder(folder, seed=42) and split != split_folder(folder, seed=7)


def test_pruning_judges_a_trial_against_completed_trials_of_earlier_rounds():
    earlier = [{0: 0.8, 1: 0.9, 2: 0.95}, {0: 0.7, 1: 0.85}]
    assert pruned(earlier, {0: 0.1, 1: 0.2})
    assert not pruned(earlier, {0: 0.9, 1: 0.95})
    assert not pruned(earlier, {0: 0.1})  # epoch 1 is warm-up
    assert not pruned(earlier[:1], {0: 0.1, 1: 0.2})  # two completed trials before any is pruned


def test_a_trial_wins_only_beyond_both_intervals_else_the_best_preset_is_kept():
    """Measured on digits (7 classes): a trial at 0.988 +- 0.024 topped fewshot-cpu's 0.964 +- 0.012 on a 2-class
    validation split, then lost to it on the test split (top-1 0.83 against 0.99). Such a trial no longer wins."""
    def trial(value, ci, preset=None):
        return optuna.trial.create_trial(value=value, user_attrs={"objective_ci95": ci, **({"preset": preset} if preset
                                                                                             else {})})

    presets = [trial(0.958, 0.014, "fast-cpu"), trial(0.964, 0.012, "fewshot-cpu")]
    kept, why = choose_winner([*presets, trial(0.9875, 0.024), trial(0.95, 0.01)])
    assert kept is presets[1]
    assert why.startswith("trial ") and "does not beat preset fewshot-cpu (0.964 ± 0.012)" in why
    clear = trial(0.999, 0.002)
    assert choose_winner([*presets, clear]) == (clear, "")
    assert choose_winner([trial(0.5, 0.1), trial(0.7, 0.3)])[0].value == 0.7  # no preset to keep: the top score
    assert choose_winner([*presets])[0] is presets[1]


def test_a_perfect_score_on_a_small_validation_split_keeps_a_wide_interval():
    """2 unseen classes of 10 images and 10 known images, all right: the interval still spans what a handful of images
    can tell (on digits a trial scoring 1.0 on such a split then lost to fewshot-cpu on the test split)."""
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    labels = {"train": np.repeat([0, 1], 8), "known": np.repeat([0, 1], 5), "unseen": np.repeat([2, 3], 10)}
    embeddings = {part: centres[y] + rng.normal(0, 0.1, (len(y), 4)) for part, y in labels.items()}

    def nearest(gallery, gallery_labels, queries):
        return gallery_labels[((queries[:, None] - gallery[None]) ** 2).sum(-1).argmin(1)]

    figures = score(embeddings, labels, nearest, seed=0)
    assert figures.value == 1.0
    assert figures.fewshot_ci > 0.1 and figures.top1_ci > 0.2  # Wilson over 20 and 10 images, not +-0
    assert figures.value - figures.ci < 0.964 + 0.012  # so it cannot beat fewshot-cpu's digits figure beyond both


def test_no_trial_within_the_budget_is_one_line(digits, store):
    with pytest.raises(ConfigError, match="no trial finished within 0 minute"):
        tune(digits[0], store / "tuned.yaml", minutes=0, pins=PINS, presets=())


def test_a_budget_too_short_for_one_trial_says_so_in_one_line(digits, store):
    """Fifteen seconds for trials of 100,000 epochs: the first trial stops at the epoch after the budget, the next
    does not start, and the user reads what one trial would need."""
    result = CliRunner().invoke(app, ["tune", "--train", str(digits[0]), "--minutes", "0.25", "--out",
                                      str(store / "tuned.yaml"), *pin_options(**{"train.epochs": 100_000})])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert re.search(r"^error: no trial finished within 0\.25 minute\(s\) \(trial 0 ran \d+ epoch\(s\) in \d+ s of "
                     r"100000: a whole trial needs about [\d.]+ min\): give --minutes more, or pin a smaller network "
                     r"or fewer epochs with --set\n\Z", result.output, re.M), result.output
    assert not (store / "tuned.yaml").exists()
    _, parents, children = _runs(store)
    assert parents[0].info.status == "FAILED" and len(children) == 1  # the round's second trial never started
    assert re.fullmatch(r"stopped at epoch \d+: the time budget ran out", children[0].data.tags["reason"])


@pytest.fixture(scope="module")
def first_session(digits, tmp_path_factory):
    """``siamese tune`` for 2 trials (the first two presets), as a user runs it."""
    root = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.delenv("SIAMESE_TUNING_STORAGE", raising=False)
        result = CliRunner().invoke(app, ["tune", "--train", str(digits[0]), "--test", str(digits[1]), "--minutes",
                                          "10", "--trials", "2", "--out", str(root / "tuned.yaml"), *pin_options()])
    assert result.exit_code == 0, result.output
    return root, result.output


def _runs(root):
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("siamese").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return mlflow, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_every_trial_is_a_nested_run_with_its_epochs(first_session):
    root, output = first_session
    mlflow, parents, children = _runs(root)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.data.tags["preset"] for c in children} == {"fast-cpu", "fewshot-cpu"}
    for child in children:
        assert child.data.tags["state"] in ("COMPLETE", "PRUNED")
        assert len(mlflow.get_metric_history(child.info.run_id, "val_objective")) == 2  # one point per epoch
        assert "model.pooling" in child.data.params
    assert parent.data.tags["best_trial"] in ("0", "1") and parent.info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "search_space.md", "summary.txt", "tuned.yaml"} <= artifacts
    assert "preset fast-cpu: " in output and "preset fewshot-cpu: " in output and "preset photos-cpu: not run" in output
    assert "objective: 0.5 x 1-shot" in output and "test top-1" in output
    assert re.search(r"the winner trained on the whole training folder in [0-9.]+ min: test top-1", output)
    assert f"--params {root / 'tuned.yaml'} --out model" in output
    processes = {c.data.tags["process"] for c in children}  # one trial process for both, not this one
    assert len(processes) == 1 and not processes.pop().endswith(f" pid {os.getpid()}")


def test_the_params_file_trains_as_it_is(first_session, tmp_path, digits):
    root, _ = first_session
    params = load_params(root / "tuned.yaml")
    assert params.preset is None and params.data.train_dir == str(digits[0])
    assert params.model.input_size == 32 and params.train.epochs == 2  # the pins stay as given
    result = CliRunner().invoke(app, ["train", "--train", str(digits[0]), "--test", str(digits[1]), "--params",
                                      str(root / "tuned.yaml"), "--epochs", "1", "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "config.json").is_file()


def test_a_stopped_study_resumes_without_rerunning_its_trials(first_session, digits, monkeypatch):
    root, _ = first_session
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    before = {c.info.run_id for c in _runs(root)[2]}
    result = tune(digits[0], root / "tuned.yaml", minutes=10, trials=3, test_dir=digits[1], pins=PINS,
                  progress=False)
    assert [row["trial"] for row in result.trials] == [0, 1, 2]
    _, parents, children = _runs(root)
    assert len(parents) == 1 and len(children) == 3 and before < {c.info.run_id for c in children}
    assert {c.data.tags["preset"] for c in children} == set(COMPARED_PRESETS)


def _sampled(root, digits, dask_address=None):
    study = tune(digits[0], root / "tuned.yaml", minutes=10, trials=3, pins=PINS, presets=(),
                 dask_address=dask_address, progress=False)
    storage = optuna.load_study(study_name=study.study, storage=study.storage)
    return [t.params for t in storage.get_trials()]


@pytest.mark.slow  # a Dask cluster and two studies, about 37 s: with the slow tests, which CI runs
def test_trials_on_dask_are_the_trials_of_a_serial_run(digits, tmp_path, monkeypatch):
    from distributed import LocalCluster

    serial, parallel = tmp_path / "serial", tmp_path / "dask"
    for root in (serial, parallel):
        root.mkdir()
    monkeypatch.chdir(serial)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{serial / 'mlflow.db'}")
    expected = _sampled(serial, digits)
    monkeypatch.chdir(parallel)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{parallel / 'mlflow.db'}")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert _sampled(parallel, digits, cluster.scheduler_address) == expected
    assert len(expected) == 3 and len({json.dumps(p, sort_keys=True) for p in expected}) == 3


def test_the_docs_show_the_search_space_as_declared():
    assert space_table() in (Path(__file__).parent.parent / "docs" / "how-to" / "tuning.md").read_text()


def test_a_ctrl_c_that_python_swallows_is_raised_at_the_next_check(capfd):
    """SIGINT landing in a finalizer (as one did in a garbage-collection callback of SQLAlchemy's): Python cannot
    raise it there and prints a traceback; during a study it is kept quiet and raised at the next epoch or trial."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    with noting_interrupts():
        Finalized()  # collected at once: the interrupt arrives inside __del__
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _finished_trials(database: Path) -> int:
    """How many trials optuna.db holds as COMPLETE or PRUNED (read only; 0 while it is being created)."""
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # no file or tables yet, or locked by the writer
        return 0


def test_ctrl_c_keeps_the_finished_trials_and_the_same_command_resumes(digits, tmp_path):
    """A real `siamese tune` sent SIGINT once a trial has finished: one line and status 130, the study's run KILLED,
    the finished trials kept in optuna.db and as child runs; the same command then runs only the missing trials."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("SIAMESE_TUNING_STORAGE", None)
    command = [str(Path(sys.executable).parent / "siamese"), "tune", "--train", str(digits[0]), "--minutes", "30",
               "--trials", "3", "--out", str(tmp_path / "tuned.yaml"), *pin_options()]
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        session = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 900
        while _finished_trials(tmp_path / "optuna.db") < 1:
            assert session.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.2)
        session.send_signal(signal.SIGINT)
        session.wait(timeout=120)
    finally:
        session.kill()
    stderr = (tmp_path / "err.txt").read_text()
    assert session.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"^error: interrupted: \d finished trial\(s\) kept in sqlite:///\S+/optuna\.db \(study tune-\S+\); "
                     r"the same command resumes the study$", stderr, re.M), stderr[-3000:]
    assert stderr.count("interrupted") == 1 and not (tmp_path / "tuned.yaml").exists()

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (name,) = optuna.study.get_all_study_names(storage)
    kept = {t.number: (t.state, t.value, t.user_attrs["mlflow_run_id"])
            for t in optuna.load_study(study_name=name, storage=storage).get_trials()
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)}
    assert 1 <= len(kept) < 3
    mlflow, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    for child in children:  # the finished trials' runs; the one Ctrl-C stopped, if any, KILLED
        trial = int(child.data.tags["optuna.trial"])
        expected = ("FINISHED", kept[trial][2]) if trial in kept else ("KILLED", child.info.run_id)
        assert (child.info.status, child.info.run_id) == expected, (trial, child.info.status)
    assert set(kept) <= {int(c.data.tags["optuna.trial"]) for c in children}
    # the trial Ctrl-C interrupted, if any: one asked but not yet given its run when the signal came has none
    interrupted = sum(t.state == optuna.trial.TrialState.FAIL
                      for t in optuna.load_study(study_name=name, storage=storage).get_trials())
    assert interrupted <= 1 and sum(c.info.status == "KILLED" for c in children) <= interrupted

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"pruned, {interrupted} interrupted or failed)" if interrupted else "pruned)") in again.stdout, again.stdout
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 3 and all(kept[t.number] == (t.state, t.value, t.user_attrs["mlflow_run_id"])
                                  for t in done if t.number in kept)
    assert sorted(t.user_attrs["preset"] for t in done) == sorted(COMPARED_PRESETS)  # none run twice
    mlflow, parents_after, children = _runs(tmp_path)
    assert [p.info.run_id for p in parents_after] == [parents[0].info.run_id]
    assert parents_after[0].info.status == "FINISHED"
    runs_of = [int(c.data.tags["optuna.trial"]) for c in children if c.info.status == "FINISHED"]
    assert sorted(runs_of) == sorted(t.number for t in done)  # one run per finished trial: none redone


def test_the_flow_runs_the_cli_code_and_writes_the_same_params_file(digits, store, prefect_server):
    """tuning_flow's study is the CLI's: `siamese tune` with the same arguments resumes it (no new trial) and
    writes the same params file, which the params model loads."""
    state = tuning_flow(str(digits[0]), str(store / "flow.yaml"), 10, trials=1, pins=PINS, return_state=True)
    assert state.is_completed() and state.result()["best"]["preset"] == "fast-cpu"
    params = load_params(store / "flow.yaml")
    assert isinstance(params, PipelineParams) and params.preset is None
    assert (params.data.train_dir, params.model.input_size, params.train.epochs) == (str(digits[0]), 32, 2)
    result = CliRunner().invoke(app, ["tune", "--train", str(digits[0]), "--minutes", "10", "--trials", "1",
                                      "--out", str(store / "cli.yaml"), *pin_options()])
    assert result.exit_code == 0, result.output
    assert (store / "cli.yaml").read_text() == (store / "flow.yaml").read_text()
    _, parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == 1 and parents[0].info.status == "FINISHED"


def test_a_trial_this_machine_cannot_train_fails_alone(digits, store, monkeypatch):
    """A sampled point whose images do not fit in memory (the training's own check refuses it) is a FAIL trial with
    the reason, its run FAILED."""
    def short_of_memory(spec, config, mlflow, run_id):
        raise ConfigError("model.input_size 224 needs about 19.4 GiB for 480 decoded images; this machine has "
                          "11.5 GiB free")

    monkeypatch.setattr(tuning, "_train_and_score", short_of_memory)
    mlflow = MlflowClient()
    experiment = mlflow.create_experiment("siamese")
    parent = mlflow.create_run(experiment).info.run_id
    config = trial_params(base_params(None), {}, PINS).core().model_dump(mode="json")
    split = tuning.write_split(split_folder(scan_folder(digits[0]), 0), store / "split")
    outcome = tuning.run_trial(tuning.TrialSpec(0, {}, None, config, split, [], time.time() + 60, mlflow.tracking_uri,
                                                experiment, parent, progress=False))
    assert outcome.state == "FAIL" and outcome.reason.startswith("model.input_size 224 needs about 19.4 GiB")
    run = mlflow.get_run(outcome.run_id)
    assert run.info.status == "FAILED" and run.data.tags["reason"] == outcome.reason


def _trial_runs(root) -> list:
    try:
        return _runs(root)[2]
    except Exception:  # the store or the experiment not made yet
        return []


def test_a_trial_whose_process_dies_fails_alone_and_the_study_goes_on(digits, store):
    """Trials run in a process of their own, the study's driver stays out of TensorFlow's memory. That process
    SIGKILLed in the middle of trial 0 (as the kernel does when memory runs out): trial 0 fails with the reason, its
    run FAILED, and trial 1 runs in a fresh process; the study ends with a winner."""
    killed: list[str] = []

    def kill_the_first_trial():
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            for run in _trial_runs(store):
                if run.info.status == "RUNNING" and run.data.tags["optuna.trial"] == "0":
                    os.kill(int(run.data.tags["process"].rsplit(" ", 1)[1]), signal.SIGKILL)
                    killed.append(run.data.tags["process"])
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_the_first_trial, daemon=True)
    watcher.start()
    result = CliRunner().invoke(app, ["tune", "--train", str(digits[0]), "--minutes", "10", "--trials", "2",
                                      "--out", str(store / "tuned.yaml"), *pin_options()])
    watcher.join(1)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert killed and "1 interrupted or failed" in result.output and (store / "tuned.yaml").is_file()
    _, parents, children = _runs(store)
    by_trial = {c.data.tags["optuna.trial"]: c for c in children}
    assert parents[0].info.status == "FINISHED" and by_trial["0"].info.status == "FAILED"
    assert by_trial["0"].data.tags["reason"] == ("the trial's process ended with signal SIGKILL (the kernel sends it "
                                                 "when memory runs out)")
    assert by_trial["1"].info.status == "FINISHED" and by_trial["1"].data.tags["process"] != killed[0]
    assert not by_trial["1"].data.tags["process"].endswith(f" pid {os.getpid()}")
