"""Gallery search over many embeddings: faiss IVF index against exact numpy search.

Run on its own (``python -m benchmarks.ann --rows 1000000``) it prints one JSON object:
index build time, exact and approximate per-query latency, recall@1 against exact
search for a sweep of ``nprobe``, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.memory import status_mb
from benchmarks.synthetic import clustered_vectors
from siamese_core.gallery import Gallery


def _latencies(gallery: Gallery, queries: np.ndarray) -> tuple[np.ndarray, list[str]]:
    times, nearest = [], []
    for query in queries:
        start = time.perf_counter()
        nearest.append(gallery.search(query[None], top_k=5)[0].nearest_path)
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000, nearest


def run(rows: int, dim: int, queries: int, nprobes: list[int], seed: int = 0) -> dict:
    """Build a clustered gallery of ``rows`` vectors and measure exact and indexed search."""
    vectors, labels, centres = clustered_vectors(rows, dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(len(centres), size=queries, replace=False)
    probe = centres[picked] + 0.25 * rng.standard_normal((queries, dim), dtype=np.float32)
    gallery = Gallery(vectors, labels, [f"c{i}" for i in range(len(centres))], [str(i) for i in range(rows)],
                      index_threshold=rows + 1)
    del vectors
    exact_ms, truth = _latencies(gallery, probe)
    gallery.index_threshold = 0
    start = time.perf_counter()
    gallery.build_index()
    build_s = time.perf_counter() - start
    sweep = []
    for nprobe in nprobes:
        gallery.nprobe = nprobe
        _latencies(gallery, probe[:5])  # warm
        ms, found = _latencies(gallery, probe)
        sweep.append({"nprobe": nprobe, "recall_at_1": float(np.mean([a == b for a, b in zip(found, truth)])),
                      "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))})
    return {
        "rows": rows, "dim": dim, "queries": queries, "index": f"IVFFlat, {gallery.build_index().nlist} lists",
        "build_s": build_s, "exact_p50_ms": float(np.percentile(exact_ms, 50)), "sweep": sweep,
        "peak_rss_mb": status_mb("VmHWM"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.dim, args.queries, args.nprobe)))


if __name__ == "__main__":
    main()
