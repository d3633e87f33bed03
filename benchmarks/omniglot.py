"""Learning-quality check on Omniglot: closed-set top-1 and few-shot accuracy on unseen classes.

Usage: python benchmarks/omniglot.py [--data DIR] [--mode closed|fewshot] [--preset fast-cpu]
       [--train-per-class N] [--split alphabet|class] [--heldout-classes N] [--train-classes N]
       [--set key=value ...] [--save DIR]
Prints a JSON report with raw-pixel and untrained-network baselines beside the trained network.
In fewshot mode, whole alphabets (or, with --split class, random classes; at least 40) are
held out of training, and every epoch logs its 20-way one-shot accuracy on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.params import preset_config
from siamese_core.config import Config, apply_overrides, parse_set_options
from siamese_core.data import scan_folder
from siamese_core.embed import decode_all, embed_images
from siamese_core.gallery import Gallery
from siamese_core.metrics import accuracy_report, few_shot_accuracy
from siamese_core.model import build_embedding_model
from siamese_core.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/datasets/omniglot-background-small"
SMALL = {
    "backbone": "small_cnn", "weights": None, "input_size": 56, "head_units": [256], "embedding_dim": 128,
    "l2_normalize": True, "margin": 0.5, "learning_rate": 1e-3, "batch_size": 64, "epochs": 5,
    "max_pairs_per_class": 40, "strategy": "random",
}


def heldout_names(classes: list[Path], count: int, by: str) -> set[str]:
    """At least ``count`` classes never trained on: whole alphabets (last first), or classes drawn at random."""
    if by == "class":
        chosen = np.random.default_rng(0).choice(len(classes), size=count, replace=False)
        return {classes[i].name for i in chosen}
    heldout: set[str] = set()
    for alphabet in sorted({c.name.split("__")[0] for c in classes}, reverse=True):
        if len(heldout) >= count:
            break
        heldout |= {c.name for c in classes if c.name.startswith(alphabet + "__")}
    return heldout


def split(source: Path, out: Path, train_per_class: int, heldout_classes: int, by: str,
          train_classes: int | None = None) -> dict[str, Path]:
    """Copy the dataset into train/test (first images / rest) and a held-out folder of unseen classes;
    ``train_classes`` keeps that many of the others (drawn at random) for training."""
    classes = sorted(d for d in source.iterdir() if d.is_dir())
    heldout = heldout_names(classes, heldout_classes, by) if heldout_classes else set()
    seen = [c for c in classes if c.name not in heldout]
    if train_classes is not None and train_classes < len(seen):
        seen = [seen[i] for i in np.random.default_rng(1).choice(len(seen), size=train_classes, replace=False)]
    for c in classes:
        files = sorted(c.iterdir())
        if c.name in heldout:
            shutil.copytree(c, out / "heldout" / c.name)
            continue
        if c not in seen:
            continue
        for part, chosen in (("train", files[:train_per_class]), ("test", files[train_per_class:])):
            if not chosen:
                continue
            (out / part / c.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, out / part / c.name / f.name)
    return {name: out / name for name in ("train", "test", "heldout") if (out / name).exists()}


def raw_pixels(paths: list[str], size: int) -> np.ndarray:
    return decode_all(paths, size)[..., 0].reshape(len(paths), -1).astype(np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mode", choices=["closed", "fewshot"], default="closed")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--train-per-class", type=int, default=14, help="the rest of each class is the test split")
    parser.add_argument("--split", choices=["alphabet", "class"], default="alphabet",
                        help="fewshot mode: hold out whole alphabets, or classes at random")
    parser.add_argument("--heldout-classes", type=int, default=40, help="fewshot mode: at least this many unseen classes")
    parser.add_argument("--train-classes", type=int, help="train on this many of the other classes (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--save", type=Path, help="keep the trained network (model.keras) and the held-out split here")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: dataset not found")
    base = preset_config(Config(), args.preset) if args.preset else apply_overrides(Config(), SMALL)
    config = apply_overrides(base, parse_set_options(args.overrides))
    size = config.model.input_size
    with tempfile.TemporaryDirectory() as tmp:
        heldout = args.heldout_classes if args.mode == "fewshot" else 0
        folders = split(args.data, Path(tmp), args.train_per_class, heldout, args.split, args.train_classes)
        train_folder = scan_folder(folders["train"])
        test_folder = scan_folder(folders["test"]) if "test" in folders else None
        report: dict = {"mode": args.mode, "split": args.split, "config": config.model_dump(), "train_classes": len(train_folder.class_names)}

        def score(embed) -> dict:
            if args.mode == "closed":
                gallery = Gallery(embed(train_folder.paths), train_folder.labels, train_folder.class_names,
                                  train_folder.paths)
                scores = accuracy_report(test_folder.label_names, gallery.search(embed(test_folder.paths), 5),
                                         train_folder.class_names, top_k=5)
                return {key: scores[key] for key in ("top1", "top5", "class_avg_accuracy")}
            held = scan_folder(folders["heldout"])
            report["heldout_classes"] = len(held.class_names)
            return few_shot_accuracy(embed(held.paths), held.labels, n_way=20, k_shot=1, episodes=args.episodes)

        report["raw_pixels"] = score(lambda paths: raw_pixels(paths, size))
        untrained = build_embedding_model(config.model)
        report["untrained"] = score(lambda paths: embed_images(untrained, paths, 128))
        start = time.perf_counter()
        result = train(config, folders["train"], folders.get("test"), verbose=2, heldout_dir=folders.get("heldout"))
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        report["triplets_per_epoch"] = len(result.triplets)
        report["history"] = result.history
        report["best_epoch"] = result.best_epoch
        report["trained"] = score(lambda paths: embed_images(result.embedding, paths, 128))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            result.embedding.save(args.save / "model.keras")
            if "heldout" in folders:
                shutil.copytree(folders["heldout"], args.save / "heldout", dirs_exist_ok=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
