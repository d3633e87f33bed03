"""Measure candidate training settings for the embedded Omniglot demo (pipelines/demo_data.py).

Usage: python benchmarks/demo_sweep.py [--only NAME ...] [--set key=value ...] [--out FILE]

Writes the demo dataset to a temporary folder, then for each configuration of CONFIGS
trains as the pipeline's train stage does (test split for validation, held-out classes
logged every epoch) and scores as its evaluate stage does (``assess``): closed-set top-1
of the known classes' test split against their train gallery, and 20-way 1-shot and
5-shot accuracy on the 20 held-out classes. Beside them, the same figures for nearest
neighbour on raw pixels and for the untrained network. Prints one JSON object per
configuration, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.demo_data import write_demo_data
from siamese_core.config import Config, apply_overrides, parse_set_options
from siamese_core.data import scan_folder
from siamese_core.embed import decode_all, embed_images
from siamese_core.evaluation import assess
from siamese_core.gallery import Gallery
from siamese_core.metrics import accuracy_report, few_shot_report
from siamese_core.model import initial_embedding_model
from siamese_core.recognizer import SiameseRecognizer, build_gallery
from siamese_core.train import train

# What every candidate shares: the fast-cpu preset's recipe, at the demo's small size.
BASE = {
    "model.backbone": "small_cnn", "model.weights": None, "model.input_size": 32, "model.pooling": "avg",
    "model.head_units": [], "model.embedding_dim": 128, "model.l2_normalize": True, "model.margin": 0.2,
    "train.optimizer": "adam", "train.learning_rate": 1e-3, "train.lr_schedule": "cosine", "train.warmup_epochs": 1,
    "train.mining": "batch_all", "train.classes_per_batch": 32, "train.images_per_class": 4,
    "train.augment.rotation": 10, "train.augment.shift": 0.1, "train.augment.zoom": 0.1, "train.augment.shear": 0.1,
    "train.augment.rotations_as_classes": True,
    "evaluate.fewshot_way": 20, "evaluate.fewshot_shots": [1, 5], "evaluate.fewshot_episodes": 500,
}
# The candidates: each changes a few keys of BASE.
CONFIGS = {
    "p32-e24": {"train.epochs": 24},
    "p16-e24": {"train.classes_per_batch": 16, "train.epochs": 24},
    "p32-e24-lr2e-3": {"train.epochs": 24, "train.learning_rate": 2e-3},
    "p32-e30-28px": {"train.epochs": 30, "model.input_size": 28},
    "p32-e12-mirrors": {"train.epochs": 12, "train.augment.mirrors_as_classes": True},
    "p32-e48": {"train.epochs": 48},
}


def fewshot(embeddings: np.ndarray, labels: np.ndarray, config: Config) -> dict[str, float]:
    """Mean N-way k-shot accuracy for each k of the config, as {"1shot": ..., "5shot": ...}."""
    e = config.evaluate
    results, _ = few_shot_report(embeddings, labels, e.fewshot_way, e.fewshot_shots, e.fewshot_episodes,
                                 seed=config.train.seed)
    return {key: round(value["mean"], 4) for key, value in results.items()}


def closed_top1(train_vectors: np.ndarray, test_vectors: np.ndarray, train_folder, test_folder) -> float:
    """Top-1 of the test queries against a gallery of the training images."""
    gallery = Gallery(train_vectors, train_folder.labels, list(train_folder.class_names), list(train_folder.paths))
    matches = gallery.search(test_vectors, 1)
    return round(accuracy_report(test_folder.label_names, matches, train_folder.class_names, 1)["top1"], 4)


def baselines(config: Config, folders: dict) -> dict[str, dict]:
    """Raw pixels (at the input size, as the pipeline's baseline) and the untrained network."""
    size, batch = config.model.input_size, config.evaluate.embed_batch_size
    untrained = initial_embedding_model(config)
    embedders = {
        "raw_pixels": lambda f: decode_all(f.paths, size, batch).reshape(len(f), -1).astype(np.float32),
        "untrained": lambda f: embed_images(untrained, f.paths, batch),
    }
    out = {}
    for name, embed in embedders.items():
        vectors = {part: embed(folder) for part, folder in folders.items()}
        out[name] = {"top1": closed_top1(vectors["train"], vectors["test"], folders["train"], folders["test"]),
                     **fewshot(vectors["heldout"], folders["heldout"].labels, config)}
    return out


def measure(name: str, config: Config, root: Path) -> dict:
    """Train one configuration on the demo data, score it and its baselines."""
    folders = {part: scan_folder(root / part) for part in ("train", "test", "heldout")}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = train(config, root / "train", root / "test", verbose=0, heldout_dir=root / "heldout")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    recognizer = SiameseRecognizer(result.embedding, build_gallery(result.embedding, folders["train"]), config)
    report = assess(recognizer, folders["test"], heldout=folders["heldout"], seed=config.train.seed).report.to_dict()
    evaluate_seconds = time.perf_counter() - start
    history = result.history
    return {
        "name": name, "train_seconds": round(train_seconds, 1), "evaluate_seconds": round(evaluate_seconds, 1),
        "epochs": config.train.epochs, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "trained": {"top1": round(report["top1"], 4),
                    **{key: round(value["mean"], 4) for key, value in report["fewshot"].items()},
                    "ci95_1shot": round(report["fewshot"]["1shot"]["ci95"], 4)},
        "baselines": baselines(config, folders),
        "last_epoch": {key: round(values[-1], 4) for key, values in history.items()},
        "overrides": CONFIGS.get(name, {}),
    }


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| config | train s | top-1 known | 1-shot | 5-shot | raw px top-1 / 1-shot / 5-shot "
             "| untrained top-1 / 1-shot / 5-shot |", "|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        t, raw, un = r["trained"], r["baselines"]["raw_pixels"], r["baselines"]["untrained"]
        lines.append(f"| {r['name']} | {r['train_seconds']} | {pct(t['top1'])} | {pct(t['1shot'])} "
                     f"| {pct(t['5shot'])} | {pct(raw['top1'])} / {pct(raw['1shot'])} / {pct(raw['5shot'])} "
                     f"| {pct(un['top1'])} / {pct(un['1shot'])} / {pct(un['5shot'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run just these configurations")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value on top of each")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    extra = parse_set_options(args.overrides)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "tensorflow_threads": "default"}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "demo"
        write_demo_data(root)
        for name in args.only or CONFIGS:
            config = apply_overrides(Config(), {**BASE, **CONFIGS[name], **extra})
            row = measure(name, config, root)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
