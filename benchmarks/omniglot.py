"""Learning-quality check on Omniglot: closed-set top-1 and few-shot accuracy on unseen classes.

Usage: python benchmarks/omniglot.py [--data DIR] [--mode closed|fewshot] [--preset fast-cpu]
       [--train-per-class N] [--split alphabet|class] [--heldout-classes N] [--train-classes N]
       [--set key=value ...] [--save DIR] [--load DIR]
Prints a JSON report with raw-pixel and untrained-network baselines beside the trained network.
In fewshot mode, whole alphabets (or, with --split class, random classes; at least 40) are
held out of training, and every epoch logs its 20-way one-shot accuracy on them. The trained
network, and the untrained one beside it, are scored as the product answers: a recogniser with the
config's ``evaluate`` settings (test-time views, class means) enrols each episode's classes and
classifies its queries (raw pixels are plain nearest neighbour);
``ms_per_query`` is the time it takes to embed one query image on this machine.
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
from siamese_core.embed import decode_all
from siamese_core.evaluation import evaluate
from siamese_core.gallery import Gallery
from siamese_core.metrics import accuracy_report, few_shot_accuracy, few_shot_report
from siamese_core.model import build_embedding_model, load_embedding
from siamese_core.recognizer import SiameseRecognizer, build_gallery
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


def ms_per_query(recognizer: SiameseRecognizer, image: str, repeats: int = 30) -> float:
    """Milliseconds to embed one query image, after a warm-up call."""
    recognizer.embed([image])
    start = time.perf_counter()
    for _ in range(repeats):
        recognizer.embed([image])
    return round((time.perf_counter() - start) / repeats * 1000, 2)


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
    parser.add_argument("--save", type=Path, help="keep the trained network (model.keras), this report and the held-out "
                        "split here")
    parser.add_argument("--load", type=Path, help="do not train: score the network a --save run kept there (same split "
                        "options) with this run's evaluate settings; its training time and baselines are copied")
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

        def score(embed) -> dict:  # raw pixels: plain nearest neighbour
            if args.mode == "closed":
                gallery = Gallery(embed(train_folder.paths), train_folder.labels, train_folder.class_names,
                                  train_folder.paths)
                scores = accuracy_report(test_folder.label_names, gallery.search(embed(test_folder.paths), 5),
                                         train_folder.class_names, top_k=5)
                return {key: scores[key] for key in ("top1", "top5", "class_avg_accuracy")}
            held = scan_folder(folders["heldout"])
            report["heldout_classes"] = len(held.class_names)
            return few_shot_accuracy(embed(held.paths), held.labels, n_way=20, k_shot=1, episodes=args.episodes)

        def answered(network) -> tuple[dict, SiameseRecognizer]:
            """A network scored as the product answers (this config's test-time views and matching): the trained
            one, and the untrained one, so that the difference is training's alone."""
            recognizer = SiameseRecognizer(network, build_gallery(network, train_folder, config.evaluate), config)
            if args.mode == "closed":
                scores = evaluate(recognizer, test_folder, top_k=5).to_dict()
                return {key: scores[key] for key in ("top1", "top5", "class_avg_accuracy")}, recognizer
            held = scan_folder(folders["heldout"])
            report["heldout_classes"] = len(held.class_names)
            return few_shot_report(recognizer.embed(held.paths), held.labels, 20, [1, 5], args.episodes,
                                   classify=recognizer.classify_among)[0], recognizer

        if args.load:  # score a network trained before, on the same split, with this config's evaluate settings
            network = load_embedding(args.load / "model.keras")
            trained_report = json.loads((args.load / "report.json").read_text())
            report.update({key: trained_report[key] for key in ("config", "train_seconds", "raw_pixels")})
            report["loaded_from"] = str(args.load)
            report["untrained"] = answered(build_embedding_model(config.model))[0]  # with this run's settings
        else:
            report["raw_pixels"] = score(lambda paths: raw_pixels(paths, size))
            report["untrained"] = answered(build_embedding_model(config.model))[0]
            start = time.perf_counter()
            result = train(config, folders["train"], folders.get("test"), verbose=2, heldout_dir=folders.get("heldout"))
            report["train_seconds"] = round(time.perf_counter() - start, 1)
            report.update(history=result.history, best_epoch=result.best_epoch)
            network = result.embedding
        report["evaluate"] = config.evaluate.model_dump()
        report["trained"], recognizer = answered(network)
        report["ms_per_query"] = ms_per_query(recognizer, train_folder.paths[0])
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            network.save(args.save / "model.keras")
            (args.save / "report.json").write_text(json.dumps(report, indent=1))
            if "heldout" in folders:
                shutil.copytree(folders["heldout"], args.save / "heldout", dirs_exist_ok=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
