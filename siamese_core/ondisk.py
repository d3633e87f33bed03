"""A gallery index that lives on disk: faiss IVF-PQ whose inverted lists are a memory-mapped file.

Built in shards: a quantizer is trained on a sample, each shard of vectors is encoded into
its own small index (anywhere: in this process or on a Dask worker, see :func:`encode_shard`),
and the shards' lists are merged into one ``lists.ivfdata`` file. Neither building nor
searching holds the vectors: a shard at a time while building, and the product-quantised
codes the queries visit (through the page cache) while searching.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import BundleError

INDEX_FILE, LISTS_FILE, TRAINED_FILE = "index.faiss", "lists.ivfdata", "trained.faiss"


def index_layout(rows: int, dim: int) -> tuple[int, int]:
    """Inverted lists (about 4 sqrt(rows), at most 65536) and PQ bytes per vector (a divisor of ``dim``, <= dim / 4)."""
    lists = int(min(65536, max(1, 4 * math.isqrt(max(rows, 1)))))
    pq_bytes = max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)
    return lists, pq_bytes


@contextmanager
def _no_precomputed_tables() -> Iterator[None]:
    """While encoding and merging, no index builds its lookup table (lists x PQ bytes x 256 floats, 293 MB
    for 5M rows): every shard read would hold one. Searching builds it once, for speed."""
    settings: Any = faiss.cvar  # a SWIG global that faiss's stub does not list
    saved = settings.precomputed_table_max_bytes
    settings.precomputed_table_max_bytes = 0
    try:
        yield
    finally:
        settings.precomputed_table_max_bytes = saved


def train_quantizer(sample: np.ndarray, lists: int, pq_bytes: int, seed: int = 0) -> bytes:
    """An empty IVF-PQ index trained on ``sample`` (serialised), the start of every shard."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], f"IVF{lists},PQ{pq_bytes}")
    faiss.extract_index_ivf(index).cp.seed = seed
    index.train(sample)
    return faiss.serialize_index(index).tobytes()


def encode_shard(trained: bytes, vectors: np.ndarray, first_id: int) -> bytes:
    """One shard's vectors encoded into a copy of the trained index, with ids from ``first_id`` (serialised)."""
    with _no_precomputed_tables():
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.add_with_ids(vectors, np.arange(first_id, first_id + len(vectors), dtype=np.int64))
    return faiss.serialize_index(index).tobytes()


def merge_shards(trained: bytes, shard_files: list[Path], folder: Path) -> Path:
    """Merge encoded shard files, in order, into ``folder``: the index and its on-disk lists.

    The shards are memory-mapped, not read into memory; faiss merges into empty lists only,
    so all shards are merged in one pass.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _no_precomputed_tables():
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in shard_files]  # kept while their lists are read
    ivf = faiss.extract_index_ivf(index)
    parts = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # not in faiss's own stub
    for shard in shards:
        parts.push_back(faiss.extract_index_ivf(shard).invlists)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(folder / LISTS_FILE))
    total = lists.merge_from_multiple(parts.data(), parts.size())
    ivf.replace_invlists(lists, False)  # `lists` stays alive (and owned by Python) until the index is written
    ivf.ntotal = index.ntotal = total
    faiss.write_index(index, str(folder / INDEX_FILE))
    return folder


def build_ondisk_index(shards: Iterable[np.ndarray], sample: np.ndarray, rows: int, folder: Path) -> Path:
    """Train on ``sample``, then encode ``shards`` (consecutive rows, ``rows`` in all) one at a time
    into files under ``folder/shards`` and merge them into ``folder``."""
    lists, pq_bytes = index_layout(rows, sample.shape[1])
    trained = train_quantizer(sample, lists, pq_bytes)
    parts = folder / "shards"
    parts.mkdir(parents=True, exist_ok=True)
    files, first = [], 0
    for number, vectors in enumerate(shards):
        files.append(parts / f"shard-{number:05d}.faiss")
        files[-1].write_bytes(encode_shard(trained, vectors, first))
        first += len(vectors)
    merge_shards(trained, files, folder)
    for file in files:
        file.unlink()
    parts.rmdir()
    return folder


def load_ondisk_index(folder: Path, nprobe: int):
    """The index of ``folder``, its lists memory-mapped, searching ``nprobe`` lists per query.

    The lists file is checked against the size the index records before any list is read: a memory map
    past the end of a truncated file would end the process with SIGBUS and no message.
    """
    folder = Path(folder)
    try:
        index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
        ivf = faiss.extract_index_ivf(index)
        if ivf.invlists is None:
            raise RuntimeError("no inverted lists")
        lists = faiss.downcast_InvertedLists(ivf.invlists)
    except RuntimeError as exc:  # faiss's own check of a damaged or missing file
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{folder / INDEX_FILE}: not a readable on-disk index ({reason}); rebuild the bundle") from None
    needed = int(getattr(lists, "totsize", 0))
    present = (folder / LISTS_FILE).stat().st_size if (folder / LISTS_FILE).is_file() else -1
    if present < needed:
        raise BundleError(f"{folder / LISTS_FILE}: {max(present, 0)} bytes, but the index needs {needed}: the file is "
                          "missing or truncated; rebuild the bundle")
    ivf.nprobe = nprobe
    return index
