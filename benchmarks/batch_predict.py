"""Batch prediction against the in-process predict loop, on one machine and on two Dask workers.

Images: the demo's test and held-out drawings copied ``--copies`` times (distinct files, so every image is read and
decoded), recognised with the demo's bundle (``dvc repro`` first). Three timings in one run:

- the library's loop, ``recognizer.predict`` over batches of ``--batch`` paths (what a user's own script does);
- ``predict_batch`` in this process (shards, part files, the final table);
- ``predict_batch`` on a local Dask cluster of two worker processes (rows compared with the in-process ones).

Writes benchmarks/results/batch-predict.json. ``python benchmarks/batch_predict.py``
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.batch_predict import predict_batch
from pipelines.inference_log import ModelIdentity
from siamese_core.recognizer import SiameseRecognizer

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, copies: int) -> list[Path]:
    """The demo's test and held-out images, ``copies`` times each, as files under ``folder``."""
    sources = sorted((ROOT / "data" / "demo" / "test").glob("*/*.png")) + sorted(
        (ROOT / "data" / "demo" / "heldout").glob("*/*.png"))
    paths = []
    for copy in range(copies):
        for index, source in enumerate(sources):
            path = folder / f"c{copy}" / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "artifacts" / "bundle")
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch-predict.json")
    args = parser.parse_args()
    identity = ModelIdentity(name="demo", version="local")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _images(root / "images", args.copies)
        recognizer = SiameseRecognizer.load(args.bundle)
        recognizer.predict([str(p) for p in paths[: args.batch]])  # warm-up: the network traced once
        started = time.perf_counter()
        labels = []
        for start in range(0, len(paths), args.batch):
            labels += [m.label for m in recognizer.predict([str(p) for p in paths[start : start + args.batch]])]
        loop_s = time.perf_counter() - started

        started = time.perf_counter()
        predict_batch(str(root / "images"), root / "local.parquet", args.bundle, identity,
                      shard_size=args.shard_size, progress=False)
        local_s = time.perf_counter() - started
        local = pq.read_table(root / "local.parquet").to_pydict()

        from distributed import LocalCluster  # only this part needs a cluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster:
            started = time.perf_counter()
            predict_batch(str(root / "images"), root / "dask.parquet", args.bundle, identity,
                          dask_address=cluster.scheduler_address, shard_size=args.shard_size, progress=False)
            dask_s = time.perf_counter() - started
        on_dask = pq.read_table(root / "dask.parquet").to_pydict()
    by_source = dict(zip(local["source"], local["label"]))
    loop_agrees = sum(by_source[str(p)] == label for p, label in zip(paths, labels)) / len(paths)
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}; shared with other work: figures are noisy",
        "images": len(paths), "batch": args.batch, "shard_size": args.shard_size,
        "loop_images_per_s": len(paths) / loop_s, "batch_images_per_s": len(paths) / local_s,
        "dask_2_workers_images_per_s": len(paths) / dask_s,
        "batch_over_loop": loop_s / local_s,
        "dask_rows_equal": on_dask["source"] == local["source"] and on_dask["label"] == local["label"]
        and bool(np.allclose(on_dask["distance"], local["distance"], atol=1e-5)),
        "loop_labels_equal": loop_agrees,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
