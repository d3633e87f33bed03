"""A gallery larger than memory: the on-disk IVF-PQ index over millions of rows.

``python -m benchmarks.ondisk --rows 5000000`` writes clustered 128-d vectors to a raw file,
shard by shard, builds the on-disk index from it shard by shard (``siamese_core.ondisk``),
then prints one JSON object: build time, the process's peak RSS against the raw vectors'
size, p50 and p95 single-query latency, and recall@1 against exact search on a sample.
No step holds more than one shard of vectors.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from siamese_core.ondisk import build_ondisk_index, load_ondisk_index


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shard(centers: np.ndarray, start: int, rows: int) -> np.ndarray:
    """Rows ``start .. start + rows`` of the synthetic gallery (the same on every call)."""
    rng = np.random.default_rng(start)
    labels = rng.integers(0, len(centers), size=rows)
    return (centers[labels] + rng.normal(scale=0.3, size=(rows, centers.shape[1]))).astype(np.float32)


def _read(file: Path, start: int, rows: int, dim: int) -> np.ndarray:
    return np.fromfile(file, dtype=np.float32, count=rows * dim, offset=start * dim * 4).reshape(rows, dim)


def run(rows: int, dim: int, shard_rows: int, queries: int, exact_queries: int, nprobe: int, folder: Path) -> dict:
    centers = np.random.default_rng(0).normal(size=(20_000, dim)).astype(np.float32)
    raw = folder / "vectors.f32"
    with raw.open("wb") as out:
        for start in range(0, rows, shard_rows):
            out.write(_shard(centers, start, min(shard_rows, rows - start)).tobytes())
    starts = range(0, rows, shard_rows)
    figures: dict = {"rows": rows, "dim": dim, "raw_vectors_mib": round(rows * dim * 4 / 2**20), "shard_rows": shard_rows,
                     "peak_rss_mib_after_writing_vectors": round(_peak_mib())}
    began = time.perf_counter()
    sample = _read(raw, 0, min(rows, 256 * 1024), dim)
    build_ondisk_index((_read(raw, s, min(shard_rows, rows - s), dim) for s in starts), sample, rows, folder / "index")
    figures["build_s"] = round(time.perf_counter() - began, 1)
    figures["peak_rss_mib_after_build"] = round(_peak_mib())
    figures["index_on_disk_mib"] = round(sum(f.stat().st_size for f in (folder / "index").iterdir()) / 2**20)
    del sample

    index = load_ondisk_index(folder / "index", nprobe)
    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(rows, size=queries, replace=False))
    probe = np.stack([_read(raw, int(p), 1, dim)[0] for p in picks]) + rng.normal(scale=0.05, size=(queries, dim))
    probe = probe.astype(np.float32)
    latencies = []
    for query in probe:
        start = time.perf_counter()
        index.search(query[None], 1)
        latencies.append((time.perf_counter() - start) * 1000)
    figures["query_ms_p50"], figures["query_ms_p95"] = (round(float(v), 3) for v in np.percentile(latencies, [50, 95]))
    figures["peak_rss_mib_after_queries"] = round(_peak_mib())
    found = index.search(probe[:exact_queries], 1)[1][:, 0]
    best = np.full(exact_queries, np.inf)
    nearest = np.zeros(exact_queries, dtype=np.int64)
    for start in starts:  # exact search, one shard of the raw file at a time
        block = _read(raw, start, min(shard_rows, rows - start), dim)
        distances = (np.sum(probe[:exact_queries] ** 2, 1)[:, None] - 2 * probe[:exact_queries] @ block.T
                     + np.sum(block**2, 1)[None, :])
        rows_best = distances.argmin(1)
        better = distances[np.arange(exact_queries), rows_best] < best
        best[better] = distances[np.arange(exact_queries), rows_best][better]
        nearest[better] = start + rows_best[better]
    figures["recall_at_1"] = round(float(np.mean(found == nearest)), 4)
    figures["exact_queries"], figures["nprobe"] = exact_queries, nprobe
    figures["peak_rss_mib"] = round(_peak_mib())
    figures["peak_rss_share_of_raw_vectors"] = round(figures["peak_rss_mib"] / figures["raw_vectors_mib"], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--folder", type=Path, default=None, help="where the vectors and the index go (a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        print(json.dumps(run(args.rows, args.dim, args.shard_rows, args.queries, args.exact_queries, args.nprobe,
                             Path(tmp))))


if __name__ == "__main__":
    main()
