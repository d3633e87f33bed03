"""Gallery embedding in shards on a local Dask cluster: images per second in this process, with one
worker and with two, and the efficiency of the second worker.

``python -m benchmarks.dask_embed [--folder ../shared/datasets/omniglot-background-small]`` prints
one JSON object. Each figure is the best of ``--repeats`` runs after a warm-up run that loads
TensorFlow and the network in the workers; every sharded result is checked against the in-process one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from distributed import LocalCluster

from siamese_core import sharding
from siamese_core.config import ModelConfig
from siamese_core.data import scan_folder
from siamese_core.embed import embed_images
from siamese_core.model import build_embedding_model, load_embedding

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared/datasets/omniglot-background-small"


def _best_rate(embed, images: int, repeats: int) -> tuple[float, np.ndarray]:
    embed()  # warm-up: TensorFlow, the network and the traced shapes in every process
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = embed()
        best = min(best, time.perf_counter() - start)
    return images / best, result


def run(folder: Path, size: int, shard_size: int, batch_size: int, repeats: int) -> dict:
    paths = scan_folder(folder).paths
    with tempfile.TemporaryDirectory() as tmp:
        build_embedding_model(ModelConfig(backbone="small_cnn", weights=None, input_size=size, embedding_dim=128,
                                          pooling="avg", head_units=[])).save(Path(tmp) / "model.keras")
        network = load_embedding(Path(tmp) / "model.keras")
        figures = {"images": len(paths), "input_size": size, "shard_size": shard_size}
        in_process, reference = _best_rate(lambda: embed_images(network, paths, batch_size),
                                           len(paths), repeats)
        figures["in_process_images_per_s"] = round(in_process, 1)
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=40) as cluster, sharding.dask_mapper(cluster.scheduler_address) as mapper:
                rate, result = _best_rate(partial(embed_images, network, paths, batch_size,
                                                  sharder=sharding.Sharder(mapper, shard_size),
                                                  model_file=Path(tmp) / "model.keras"), len(paths), repeats)
            np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-6)
            figures[f"dask_{workers}_workers_images_per_s"] = round(rate, 1)
    figures["efficiency_2_workers"] = round(figures["dask_2_workers_images_per_s"]
                                            / (2 * figures["dask_1_workers_images_per_s"]), 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder}: no such dataset folder (pass --folder)")
    print(json.dumps(run(args.folder, args.size, args.shard_size, args.batch_size, args.repeats)))


if __name__ == "__main__":
    main()
