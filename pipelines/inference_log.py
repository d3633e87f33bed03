"""The inference log: one record per recognised image, written in the background to Parquet files.

Every path that answers for a registered model writes here when a log is configured
(``monitoring.log_uri``, or ``$SIAMESE_INFERENCE_LOG``): ``siamese serve`` over HTTP, ``predict_flow``
and ``siamese predict --log``. A record holds the time, request id, model name, version and alias,
the input's sha256, size and pixel dimensions, the top-k labels and distances, the decision (what the
client was answered: known or unknown), the unknown score and whether it is over the calibrated threshold
(``over_threshold``: where rejection is off, the answers rejection would have made unknown), the margin to
the second class, the latency, and optionally the embedding (float16). Images are never logged; with
``monitoring.log_images`` the images of answers that need a person (unknown or over the threshold, small
margins) are copied into the review queue.

Logging never blocks or fails a request: records go into a bounded queue that a writer thread
empties. Every record that cannot be queued or written is dropped and counted (:meth:`InferenceLog.stats`);
an outage is warned about once, when the first record is dropped, and its end in one line with the
records it lost. Files are ``<uri>/date=YYYY-MM-DD/<time>-<host>-<pid>-<id>.parquet``; a local
file is written under a hidden name and renamed, an S3 object appears whole when its upload ends,
so a reader (or a ``kill -9``) never meets half a file. Local files are private to their owner
(0600, in folders made 0700): they hold a digest of every query, its answer and its request id.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from siamese_core.data import UNKNOWN

from .feedback import inside, name_problem

if TYPE_CHECKING:
    from siamese_core.gallery import Match

    from .params import MonitoringConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("time", pa.timestamp("ms", tz="UTC")),
    ("request_id", pa.string()),
    ("source", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_alias", pa.string()),
    ("sha256", pa.string()),
    ("bytes", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label", pa.string()),
    ("distance", pa.float64()),
    ("top_k_labels", pa.list_(pa.string())),
    ("top_k_distances", pa.list_(pa.float64())),
    ("decision", pa.string()),  # what the client was answered: known, or unknown (the label "unknown")
    ("unknown_score", pa.float64()),
    ("over_threshold", pa.bool_()),  # the score over the calibrated threshold (null: no threshold)
    ("margin", pa.float64()),
    ("latency_ms", pa.float64()),
    ("embedding", pa.list_(pa.float16())),
    ("agrees", pa.bool_()),  # a shadow answer (source "shadow"): the same class as the answer the client got
])


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: registered name, version and the alias it was loaded by (or a bundle folder)."""

    name: str
    version: str
    alias: str | None = None


def filesystem(uri: str):
    """The fsspec filesystem and root path of a folder or URI; an ``s3://`` one uses the stack's endpoint
    (``$MLFLOW_S3_ENDPOINT_URL``) and gives up on an unreachable server within seconds, not minutes."""
    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        options = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}}
        if os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["MLFLOW_S3_ENDPOINT_URL"]
    return fsspec.core.url_to_fs(uri, **options)


def private_folder(folder: str | os.PathLike) -> None:
    """Make ``folder`` and each missing folder above it 0700 (the umask can only narrow it); folders that
    exist keep their mode, so one the user opened stays open."""
    path = Path(folder)
    for level in [*reversed(path.parents), path]:
        if not level.is_dir():
            level.mkdir(mode=0o700, exist_ok=True)


def _private(path: str, flags: int) -> int:
    """An ``open`` opener that creates files 0600."""
    return os.open(path, flags, 0o600)


def _dimensions(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only
            return image.size
    except Exception:  # the recogniser already decoded it; a header Pillow cannot re-read is not worth failing on
        return None, None


class Judgement(NamedTuple):
    """What an answer was, as the log records it."""

    decision: str  # what the client was answered: "unknown" when its label is unknown, else "known"
    unknown_score: float | None
    over_threshold: bool | None  # the score over the calibrated threshold: rejected, or would be with rejection on


def judged(recognizer, queries: np.ndarray, matches: list[Match]) -> list[Judgement]:
    """Each answer's decision, exactly as the client was answered, with its unknown score and whether that is over
    the bundle's calibrated threshold: where rejection is off, an answer over it keeps its class (``known``) and
    is marked ``over_threshold``. Without a threshold there is no score to judge by (``over_threshold`` None)."""
    decisions = [UNKNOWN if m.label == UNKNOWN else "known" for m in matches]
    threshold = recognizer.threshold
    if threshold is None or not len(matches):
        return [Judgement(decision, m.unknown_score, None) for decision, m in zip(decisions, matches)]
    given = [m.unknown_score for m in matches]
    scores = ([float(s) for s in given if s is not None] if None not in given
              else recognizer.unknown_scores(queries, matches).tolist())
    return [Judgement(decision, float(score), score > threshold) for decision, score in zip(decisions, scores)]


def margin_of(match: Match) -> float | None:
    """How much closer the answer is than the next class (None with a single class)."""
    return float(match.top_k[1][1] - match.top_k[0][1]) if len(match.top_k) > 1 else None


class InferenceLog:
    """A background writer of inference records to ``uri`` (a folder or an fsspec URI such as ``s3://``)."""

    def __init__(self, uri: str, settings: MonitoringConfig, identity: ModelIdentity, source: str):
        self.uri, self.settings, self.identity, self.source = uri.rstrip("/"), settings, identity, source
        self.fs, self.root = filesystem(self.uri)
        self.review_fs, self.review_root = filesystem(settings.review_dir)
        self.local = self.fs.protocol in ("file", ("file", "local"))
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self._counts = {"written": 0, "dropped": 0, "files": 0, "review": 0, "review_lost": 0}
        self._review_failing = False  # an outage of the review queue: images are being lost
        self._lock = threading.Lock()
        self._failing = False  # an outage: records are being dropped
        self._lost = 0  # records dropped in this outage
        self._closed = False
        self._wake = threading.Event()  # set by a full batch or by close()
        self._thread = threading.Thread(target=self._write_loop, name="inference-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def stats(self) -> dict[str, int]:
        """Records written and dropped, files written, images put in the review queue and lost to it, so far."""
        with self._lock:
            return dict(self._counts)

    def submit(self, images: list[bytes], matches: list[Match], decisions: list[Judgement],
               embeddings: np.ndarray | None, latency_ms: float, request_id: str | None = None,
               agreement: list[bool] | None = None) -> None:
        """Queue one record per image of a request (``decisions`` from :func:`judged`); never raises, never waits.
        Every record that is not queued is counted as dropped."""
        queued = 0
        try:
            request_id = request_id or uuid.uuid4().hex
            now = datetime.now(UTC)
            for row, (data, match, (decision, score, over)) in enumerate(zip(images, matches, decisions)):
                width, height = _dimensions(data)
                margin = margin_of(match)
                record: dict[str, Any] = {
                    "time": now, "request_id": request_id, "source": self.source, "model_name": self.identity.name,
                    "model_version": self.identity.version, "model_alias": self.identity.alias,
                    "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "width": width, "height": height,
                    "label": match.label, "distance": float(match.distance),
                    "top_k_labels": [label for label, _ in match.top_k],
                    "top_k_distances": [float(d) for _, d in match.top_k],
                    "decision": decision, "unknown_score": score, "over_threshold": over, "margin": margin,
                    "latency_ms": latency_ms,
                    "embedding": (embeddings[row].astype(np.float16)
                                  if self.settings.log_embeddings and embeddings is not None else None),
                    "agrees": None if agreement is None else agreement[row],
                }
                needs_review = (decision == UNKNOWN or bool(over)
                                or (margin is not None and margin < self.settings.review_margin))
                image = data if self.settings.log_images and needs_review else None
                self._queue.put_nowait((record, image, row))
                queued += 1
        except queue.Full:
            self._drop(len(images) - queued, f"the queue of {self.settings.queue_size} records is full")
        except Exception as exc:  # logging must not fail the request it describes
            self._drop(len(images) - queued, f"{type(exc).__name__}: {exc}")
        if self._queue.qsize() >= self.settings.flush_records:
            self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _drop(self, count: int, reason: str) -> None:
        """Count ``count`` records as lost; the first drop of an outage is warned about."""
        with self._lock:
            self._counts["dropped"] += count
            self._lost += count
            starts, self._failing = not self._failing, True
        if starts:
            log.warning("inference log %s: dropping records (%s); requests are still answered, drops are counted",
                        self.uri, reason)

    def _recover(self, dropped_before: int) -> None:
        """End an outage, in one line with the records it lost, unless a record was dropped since ``dropped_before``
        was counted."""
        with self._lock:
            if not self._failing or self._counts["dropped"] != dropped_before:
                return
            lost, self._failing, self._lost = self._lost, False, 0
        log.warning("inference log %s: writing again; %d records were dropped while it failed", self.uri, lost)

    def _write_loop(self) -> None:
        """Every ``flush_seconds``, or as soon as ``flush_records`` wait, write what is queued in files of at most
        ``flush_records``; stop once closed and drained. Requests never wake this thread one by one: waking it per
        record cost a served model a fifth of its throughput in thread switches."""
        while True:
            self._wake.wait(self.settings.flush_seconds)
            self._wake.clear()
            dropped_before = self.stats()["dropped"]
            batch = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            written = [self._write(batch[start:start + self.settings.flush_records])
                       for start in range(0, len(batch), self.settings.flush_records)]
            if any(written):  # an outage ends with a round that wrote and dropped nothing
                self._recover(dropped_before)
            if self._closed and self._queue.empty():
                return

    def _write(self, batch: list[tuple[dict, bytes | None, int]]) -> bool:
        """Write ``batch`` as one file; False when that failed (its records are dropped and counted)."""
        records = [record for record, _, _ in batch]
        try:
            day = records[0]["time"].strftime("%Y-%m-%d")
            name = (f"{records[0]['time'].strftime('%H%M%S%f')}-{socket.gethostname()}-{os.getpid()}-"
                    f"{uuid.uuid4().hex[:8]}.parquet")
            folder = f"{self.root}/date={day}"
            table = pa.Table.from_pylist(records, schema=SCHEMA)
            if self.local:
                private_folder(folder)
                hidden = f"{folder}/.{name}.tmp"  # readers skip hidden files; the rename is atomic
                try:
                    with open(hidden, "wb", opener=_private) as file:
                        pq.write_table(table, file)
                    os.replace(hidden, f"{folder}/{name}")
                except BaseException:
                    with contextlib.suppress(OSError):  # a full disk leaves no part-written file behind
                        os.remove(hidden)
                    raise
            else:
                with self.fs.open(f"{folder}/{name}", "wb") as file:  # an object store shows the object whole
                    pq.write_table(table, file)
        except Exception as exc:
            self._drop(len(records), f"{type(exc).__name__}: {exc}")
            return False
        with self._lock:
            self._counts["written"] += len(records)
            self._counts["files"] += 1
        for record, image, row in batch:
            if image is not None:
                self._to_review(record, image, row)
        return True

    def _to_review(self, record: dict, image: bytes, row: int) -> None:
        """Put an image and what the model said of it in ``<review_dir>/pending/<suggested label>/``, named by what
        the server knows (the time, the image's sha256, its row), never by what a client sent: the request id is
        data in the sidecar. The image goes first, the sidecar that lists it last, each whole or not at all; an item
        that cannot be kept is counted (``review_lost``) and an outage warned about once, and once when it ends."""
        suggested = record["top_k_labels"][0] if record["top_k_labels"] else UNKNOWN
        pending = f"{self.review_root}/pending"
        folder = f"{pending}/{UNKNOWN if name_problem(suggested) else suggested}"
        stem = f"{folder}/{record['time']:%Y%m%dT%H%M%S%f}-{record['sha256'][:16]}-{row}"
        sidecar = {key: record[key] for key in ("request_id", "model_name", "model_version", "sha256", "label",
                                                "distance", "decision", "unknown_score", "over_threshold", "margin")}
        sidecar |= {"time": record["time"].isoformat(),
                    "top_k": [{"label": label, "distance": d}
                              for label, d in zip(record["top_k_labels"], record["top_k_distances"])]}
        files = {f"{stem}{_extension(image)}": image,
                 f"{stem}.json": json.dumps(sidecar, ensure_ascii=False, indent=1).encode()}
        try:
            if self.review_fs.protocol in ("file", ("file", "local")):
                private_folder(folder)
                if not inside(folder, pending):
                    raise OSError(f"{folder} is a link leaving {pending}")
                _keep_whole(files)
            else:  # an object store shows each object whole
                self.review_fs.makedirs(folder, exist_ok=True)
                _keep_whole(files, self.review_fs)
        except Exception as exc:
            with self._lock:
                self._counts["review_lost"] += 1
                starts, self._review_failing = not self._review_failing, True
            if starts:
                log.warning("review queue %s: cannot keep images (%s); requests are still answered, lost images are "
                            "counted (review_lost)", self.review_root, exc)
            return
        with self._lock:
            self._counts["review"] += 1
            ends, self._review_failing = self._review_failing, False
            lost = self._counts["review_lost"]
        if ends:
            log.warning("review queue %s: keeping images again (%d lost in all)", self.review_root, lost)


def _keep_whole(files: dict[str, bytes], fs=None) -> None:
    """Write ``files`` in their order, each whole or not at all (locally, with no ``fs``: 0600; with an fsspec
    ``fs``: one object each); when one fails, the ones written before it are removed."""
    kept: list[str] = []
    try:
        for path, data in files.items():
            if fs is None:
                _write_private(path, data)
            else:
                fs.pipe_file(path, data)
            kept.append(path)
    except BaseException:
        for path in kept:
            with contextlib.suppress(OSError):
                if fs is None:
                    os.remove(path)
                else:
                    fs.rm_file(path)
        raise


def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` (0600) under a hidden name, renamed once whole: a full disk leaves no part of it."""
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(hidden, "wb", opener=_private) as file:
            file.write(data)
        os.replace(hidden, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(hidden)
        raise


def _extension(image: bytes) -> str:
    try:
        with Image.open(io.BytesIO(image)) as opened:
            return "." + (opened.format or "img").lower().replace("jpeg", "jpg")
    except Exception:
        return ".img"


def open_log(settings: MonitoringConfig, identity: ModelIdentity, source: str) -> InferenceLog | None:
    """The inference log for answers of ``model_uri``, or None when logging is off."""
    uri = settings.log_location()
    return InferenceLog(uri, settings, identity, source) if uri else None


def attach(model, inference_log: InferenceLog | None) -> InferenceLog | None:
    """Have a loaded pyfunc model of this project write its answers to ``inference_log``; returns the log. Every
    version loaded in this process runs this process's code (:mod:`pipelines.integrity`), so every one can."""
    if inference_log is not None:
        model.unwrap_python_model().log_to(inference_log)
    return inference_log
