"""Peak memory of embedding and evaluating a folder of ``--images`` small images.

Run on its own (``python -m benchmarks.memory --images 10000``) it prints one JSON
object. ``--mode library`` streams through ``build_gallery`` and ``evaluate``;
``--mode reference`` decodes everything into one array, predicts it whole and
compares all queries with all gallery rows at once, as the original code did.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from benchmarks.synthetic import make_tiny_images


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc (``VmHWM``: peak RSS since exec, ``VmRSS``: now)."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run(images: int, mode: str, input_size: int = 64) -> dict:
    """Embed ``images`` tiny images as a gallery and evaluate the same folder against it."""
    from siamese_core.config import Config, apply_overrides
    from siamese_core.data import scan_folder
    from siamese_core.distance import squared_distances
    from siamese_core.embed import decode_all
    from siamese_core.evaluation import evaluate
    from siamese_core.model import build_embedding_model
    from siamese_core.recognizer import SiameseRecognizer, build_gallery

    config = apply_overrides(Config(), {"backbone": "small_cnn", "weights": None, "input_size": input_size})
    with tempfile.TemporaryDirectory() as tmp:
        folder = scan_folder(make_tiny_images(tmp, images))
        model = build_embedding_model(config.model)
        model.predict(np.zeros((2, input_size, input_size, 3), np.float32), verbose=0)
        before = status_mb("VmRSS")
        start = time.perf_counter()
        if mode == "library":
            recognizer = SiameseRecognizer(model, build_gallery(model, folder), config)
            top1 = evaluate(recognizer, folder).top1
        else:
            embeddings = model.predict(decode_all(folder.paths, input_size).astype(np.float32), verbose=0)
            nearest = squared_distances(embeddings, embeddings).argmin(axis=1)
            top1 = float(np.mean(folder.labels[nearest] == folder.labels))
        seconds = time.perf_counter() - start
    return {"images": images, "mode": mode, "seconds": seconds, "top1": top1,
            "rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--mode", choices=["library", "reference"], default="library")
    parser.add_argument("--input-size", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.mode, args.input_size)))


if __name__ == "__main__":
    main()
