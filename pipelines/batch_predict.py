"""Batch prediction: every image of a folder or an ``s3://`` prefix recognised into one Parquet table, in shards.

Each shard of ``shard_size`` images becomes a part file ``<OUT>.parts/part-<n>-<key>.parquet``, written whole or not
at all (:func:`siamese_core.io.atomic_path`); its key is the digest of its sources and the model version, so a rerun
(after a crash, a ``kill -9``) skips every part already written and a changed input or model is predicted again.
The final table is the parts in order. Shards run in this process, or on a Dask cluster (``dask_address``: its workers
must reach the input, the model bundle and ``OUT``'s folder). A row holds the source, its sha256, the label, distance,
decision (what a client would be answered), unknown score, the top-k, the model's name and version; an image that
cannot be read or decoded is a row with its ``error``, and the job goes on.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from siamese_core.data import IMAGE_SUFFIXES, decode_image
from siamese_core.errors import DatasetError, ImageError
from siamese_core.io import atomic_path
from siamese_core.sharding import connect, shards

from .inference_log import ModelIdentity, filesystem, judged
from .registry import download_bundle, model_identity

DEFAULT_SHARD_SIZE = 512
SCHEMA = pa.schema([
    ("source", pa.string()),
    ("sha256", pa.string()),
    ("label", pa.string()),
    ("distance", pa.float64()),
    ("decision", pa.string()),
    ("unknown_score", pa.float64()),
    ("top_k_labels", pa.list_(pa.string())),
    ("top_k_distances", pa.list_(pa.float64())),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("error", pa.string()),
])


@dataclass(frozen=True)
class Shard:
    """One part of the job: its sources (as the input's filesystem names them) and where its part file goes."""

    index: int
    sources: tuple[str, ...]
    part: str


def list_inputs(input_uri: str) -> list[str]:
    """The image files under a folder or ``s3://`` prefix, sorted (hidden files and folders left out)."""
    fs, root = filesystem(input_uri)
    if not fs.isdir(root):
        raise DatasetError(f"{input_uri}: no such folder or prefix")
    found = [path for path in fs.find(root) if Path(path).suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in Path(path).relative_to(root).parts)]
    return sorted(found)


def plan(sources: list[str], out: Path, identity: ModelIdentity, shard_size: int) -> list[Shard]:
    """The shards of a job and their part files, named by what they hold."""
    parts = out.with_name(f"{out.name}.parts")
    planned = []
    for index, chunk in enumerate(shards(sources, shard_size)):
        key = hashlib.sha256("\n".join([identity.name, identity.version, *chunk]).encode()).hexdigest()[:12]
        planned.append(Shard(index, tuple(chunk), str(parts / f"part-{index:05d}-{key}.parquet")))
    return planned


@functools.cache
def _recognizer(bundle: str):
    """The recogniser of a bundle, loaded once per process (a Dask worker keeps it for every shard it runs)."""
    from siamese_core.recognizer import SiameseRecognizer  # TensorFlow: only where shards are predicted

    return SiameseRecognizer.load(bundle)


def _read(fs, path: str, size: int) -> tuple[str, Any]:
    """An image's sha256 and its decoded pixels, or its sha256 ("" if unread) and the error."""
    try:
        data = fs.cat_file(path)
    except OSError as exc:
        return "", f"cannot read: {exc}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, decode_image(data, size)
    except ImageError as exc:
        return digest, str(exc).removeprefix("<bytes>: ")


def predict_shard(shard: Shard, input_uri: str, bundle: str, identity: ModelIdentity) -> pa.Table:
    """The rows of one shard: the images read and decoded on threads, embedded and searched in batches."""
    recognizer = _recognizer(bundle)
    fs, _ = filesystem(input_uri)
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
        read = list(pool.map(lambda path: _read(fs, path, recognizer.input_size), shard.sources))
    good = [i for i, (_, pixels) in enumerate(read) if not isinstance(pixels, str)]
    answers = {}
    if good:
        queries = recognizer.embed([read[i][1] for i in good])
        matches = recognizer.match(queries)
        answers = dict(zip(good, zip(matches, judged(recognizer, queries, matches))))
    scheme = input_uri.partition("://")[0] + "://" if "://" in input_uri else ""  # fsspec names s3 objects bucket/key
    rows: list[dict[str, Any]] = []
    for i, (source, (digest, pixels)) in enumerate(zip(shard.sources, read)):
        row: dict[str, Any] = {"source": scheme + source, "sha256": digest, "model_name": identity.name,
                               "model_version": identity.version}
        if i in answers:
            match, (decision, score, _) = answers[i]
            row |= {"label": match.label, "distance": float(match.distance), "decision": decision,
                    "unknown_score": score, "top_k_labels": [label for label, _ in match.top_k],
                    "top_k_distances": [float(d) for _, d in match.top_k]}
        else:
            row["error"] = pixels
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_shard(shard: Shard, input_uri: str, bundle: str, identity: ModelIdentity) -> int:
    """Predict one shard and write its part file whole (a temporary file renamed); returns its images."""
    table = predict_shard(shard, input_uri, bundle, identity)
    with atomic_path(shard.part) as tmp:
        pq.write_table(table, tmp)
    return len(shard.sources)


def _run_shards(todo: list[Shard], input_uri: str, bundle: str, identity: ModelIdentity,
                dask_address: str | None) -> Iterator[int]:
    """Run the shards here or on the Dask cluster, yielding each one's images as it finishes."""
    if dask_address is None:
        for shard in todo:
            yield write_shard(shard, input_uri, bundle, identity)
        return
    with connect(dask_address) as dask:  # the workers write the parts as they finish; the bar follows in order
        for future in dask.map(write_shard, todo, input_uri=input_uri, bundle=bundle, identity=identity, retries=2,
                               pure=False):
            yield future.result()


def predict_batch(input_uri: str, out: str | os.PathLike, bundle: str | os.PathLike, identity: ModelIdentity,
                  dask_address: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """Recognise every image under ``input_uri`` with the bundle at ``bundle`` into the Parquet table ``out``, shard
    by shard, skipping shards already written (see the module's docstring). Returns what was done."""
    out = Path(out)
    sources = list_inputs(input_uri)
    shards_planned = plan(sources, out, identity, shard_size)
    parts = out.with_name(f"{out.name}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".part-*.tmp"):  # left by a process killed while writing: never a part
        stale.unlink()
    todo = [shard for shard in shards_planned if not Path(shard.part).is_file()]
    done = len(sources) - sum(len(shard.sources) for shard in todo)
    with tqdm(total=len(sources), initial=done, unit="img", desc="predict-batch", disable=not progress) as bar:
        for count in _run_shards(todo, input_uri, str(bundle), identity, dask_address):
            bar.update(count)
    table = pa.concat_tables([pq.read_table(shard.part) for shard in shards_planned] or [SCHEMA.empty_table()])
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return {"out": str(out), "images": len(sources), "shards": len(shards_planned),
            "skipped_shards": len(shards_planned) - len(todo), "errors": len(table) - table.column("error").null_count,
            "model": f"{identity.name}/{identity.version}"}


def predict_with(model_uri: str, input_uri: str, out: str | os.PathLike, dask_address: str | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """:func:`predict_batch` with a bundle folder or a registered version (``models:/NAME@alias``), downloaded here;
    its rows name the version. The code of ``siamese predict-batch`` and of the batch-prediction flow."""
    bundle = download_bundle(model_uri) if model_uri.startswith("models:/") else Path(model_uri)
    return predict_batch(input_uri, out, bundle, model_identity(model_uri), dask_address, shard_size, progress)
