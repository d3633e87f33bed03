"""Outputs that cannot be written: a full disk and a read-only folder, on real (tmpfs) file systems.

Mounting needs root; without it these tests skip with the reason.
"""

import subprocess
import sys

import pytest

from support.disks import tmpfs
from support.images import make_digits_dataset
from support.tiny import tiny_set_options

TINY = [*tiny_set_options(), "--epochs", "2"]


def _train(tmp_path, out) -> subprocess.CompletedProcess:
    train_dir, test_dir = make_digits_dataset(tmp_path / "data", classes=3)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--train", str(train_dir),
                           "--test", str(test_dir), "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "small", "size=16k") as small:
        result = _train(tmp_path, small / "bundle")
        left = sorted(p.name for p in small.iterdir())
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ".bundle.checkpoint: cannot write it (No space left on device)" in last
    assert "Traceback" not in result.stderr and "Epoch 1" in result.stdout
    assert left == []  # no half-written checkpoint or bundle


def test_a_read_only_output_folder_fails_before_training(tmp_path):
    with tmpfs(tmp_path / "readonly", "ro,size=16k") as readonly:
        result = _train(tmp_path, readonly / "bundle")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {readonly}: cannot write the bundle and its checkpoints here (Read-only file system)")
    assert "Epoch" not in result.stdout


def test_an_interrupt_during_a_folder_swap_takes_effect_after_it(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM that lands between the steps of replacing a folder (move the old one aside, move the
    new one in, delete the old one) waits for the swap: the new folder is whole, no old copy is left."""
    import os
    import shutil
    import signal

    from siamese_core.io import atomic_dir

    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    remove = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if ".old-" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the old copy is being removed
        remove(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
