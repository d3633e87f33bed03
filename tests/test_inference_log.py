"""The inference log's writer on its own: outages warned about once each with what they lost, every dropped
record counted, and files private to their owner."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipelines import inference_log
from pipelines.inference_log import InferenceLog, ModelIdentity
from pipelines.params import MonitoringConfig
from siamese_core.gallery import Match


def _log(folder: Path, **settings) -> InferenceLog:
    config = MonitoringConfig(log_uri=str(folder / "log"), review_dir=str(folder / "review"), **settings)
    return InferenceLog(str(folder / "log"), config, ModelIdentity("watched", "1"), "test")


def _send(log: InferenceLog, images: int) -> None:
    match = Match("digit 1", 0.25, [("digit 1", 0.25), ("digit 2", 0.9)])
    log.submit([b"not an image"] * images, [match] * images, [("known", 0.1, False)] * images, None, 1.5)


def _until(log: InferenceLog, key: str, value: int) -> None:
    deadline = time.monotonic() + 20
    while log.stats()[key] != value:
        assert time.monotonic() < deadline, f"{key} is still {log.stats()[key]}, not {value}"
        time.sleep(0.02)


def _full_disk(path: str, flags: int) -> int:
    """Opens /dev/full instead of the file: every write fails with ENOSPC, as on a full disk."""
    return os.open("/dev/full", os.O_WRONLY)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_each_outage_is_warned_once_and_its_end_says_how_many_records_it_lost(tmp_path, monkeypatch, caplog):
    """A full disk, recovery, then a folder the log cannot write into, recovery: two warnings, two recovery
    lines with the records lost in each outage, and nothing else however many records were dropped."""
    log = _log(tmp_path, flush_seconds=0.05)
    caplog.set_level(logging.WARNING, logger="pipelines.inference_log")
    try:
        _send(log, 2)
        _until(log, "written", 2)
        monkeypatch.setattr(inference_log, "_private", _full_disk)
        _send(log, 3)
        _until(log, "dropped", 3)
        _send(log, 2)
        _until(log, "dropped", 5)
        monkeypatch.undo()
        _send(log, 1)
        _until(log, "written", 3)
        (tmp_path / "log").rename(tmp_path / "moved")  # a file where the log's folder was: no folder to write in
        (tmp_path / "log").write_bytes(b"")
        _send(log, 4)
        _until(log, "dropped", 9)
        (tmp_path / "log").unlink()
        (tmp_path / "moved").rename(tmp_path / "log")
        _send(log, 1)
        _until(log, "written", 4)
    finally:
        log.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4, lines
    assert "dropping records (OSError: [Errno 28] No space left on device)" in lines[0]
    assert lines[1].endswith("writing again; 5 records were dropped while it failed")
    assert "dropping records (" in lines[2] and "Errno 28" not in lines[2]
    assert lines[3].endswith("writing again; 4 records were dropped while it failed")
    assert (log.stats()["written"], log.stats()["dropped"], log.stats()["files"]) == (4, 9, 3)
    assert not list((tmp_path / "log").rglob(".*.tmp"))  # the failed writes left no part-written file
    assert ds.dataset(tmp_path / "log", format="parquet", partitioning="hive").count_rows() == 4


def test_a_request_into_a_full_queue_counts_every_record_it_loses(tmp_path):
    """A queue of 5 and a writer not yet due: an 8-image request queues 5 and counts 3 dropped, the next one
    counts all 8; the 5 queued are written."""
    log = _log(tmp_path, queue_size=5, flush_records=100, flush_seconds=60)
    try:
        _send(log, 8)
        assert log.stats()["dropped"] == 3
        _send(log, 8)
        assert log.stats()["dropped"] == 11
    finally:
        log.close()
    assert (log.stats()["written"], log.stats()["dropped"], log.stats()["files"]) == (5, 11, 1)


def test_log_files_and_the_folders_made_for_them_are_private(tmp_path):
    """Whatever the umask, the Parquet files are 0600 and each folder the log makes is 0700."""
    previous = os.umask(0o022)
    try:
        log = _log(tmp_path / "new", flush_seconds=0.05)
        _send(log, 2)
        _until(log, "written", 2)
        log.close()
    finally:
        os.umask(previous)
    [written] = (tmp_path / "new" / "log").rglob("*.parquet")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    for folder in (tmp_path / "new", tmp_path / "new" / "log", written.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
