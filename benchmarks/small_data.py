"""Small-data benchmark across kinds of images: every preset against raw pixels and the untrained network.

Usage: python benchmarks/small_data.py [--datasets digits,omniglot,glyphs,faces,objects]
       [--presets fast-cpu,fewshot-cpu] [--set key=value ...] [--out benchmarks/results/small-data.json]

Each data set is written as the product's input (``train/``, ``test/`` and ``heldout/`` class folders,
PNG files) into a temporary folder, a recogniser is trained with each preset as ``siamese train``
trains it, and it is scored as the evaluate stage scores it (``siamese_core.evaluation.assess``):
top-1 and MAP@R of the test split against the training gallery, 1- and 5-shot episodes and the
open-set figures on the held-out classes, beside the same figures for nearest neighbour on raw pixels
and on the untrained network. Results are merged into the JSON file by data set and preset; the documentation's
small-data table is generated from it (``python -m pipelines.doc_figures``).

The data sets (each: known classes with 8 training and 2 test images, plus held-out classes):
- digits: handwritten digits from scikit-learn (bundled, 8x8 greyscale; 7 known + 3 held-out classes).
- omniglot: 40 handwritten characters of ``../shared/datasets/omniglot-background-small`` (30 + 10).
- glyphs: printed letters and digits in the 20 typefaces matplotlib ships (26 + 10; one font is one image).
- faces: the Olivetti faces (AT&T), fetched by scikit-learn into its data folder (30 + 10 subjects).
- objects: CIFAR-100 training images, fetched by Keras into its cache (colour photos; 30 + 10 classes).
A data set that cannot be read or fetched here is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared/datasets/omniglot-background-small"
RESULTS = ROOT / "benchmarks/results/small-data.json"
TRAIN, TEST = 8, 2  # images per known class; held-out classes keep TRAIN + TEST


def _write(out: Path, classes: list[tuple[str, list[np.ndarray]]], heldout: int) -> Path:
    """Write ``classes`` (name, images) as train/test (known) and heldout folders; the last ``heldout`` classes are held out."""
    for rank, (name, images) in enumerate(classes):
        known = rank < len(classes) - heldout
        for i, image in enumerate(images[: TRAIN + TEST]):
            split = ("train" if i < TRAIN else "test") if known else "heldout"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:02d}.png")
    return out


def _by_class(images: np.ndarray, labels: np.ndarray, names: list[str], count: int, seed: int = 0):
    """``count`` classes drawn at random, each with TRAIN + TEST of its images drawn at random."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.unique(labels), size=count, replace=False)
    return [(names[c], [images[i] for i in rng.permutation(np.flatnonzero(labels == c))[: TRAIN + TEST]])
            for c in chosen]


def digits(out: Path) -> Path:
    """scikit-learn's handwritten digits, scaled from 16 grey levels to 8 bits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    return _write(out, _by_class(images, data.target, [f"digit_{d}" for d in range(10)], 10), heldout=3)


def omniglot(out: Path) -> Path:
    """40 Omniglot characters drawn at random, 10 drawings each."""
    if not OMNIGLOT.is_dir():
        raise FileNotFoundError(f"{OMNIGLOT}: not present")
    names = sorted(p.name for p in OMNIGLOT.iterdir() if p.is_dir())
    chosen = np.random.default_rng(0).choice(names, size=40, replace=False)
    classes = [(name, [np.asarray(Image.open(f).convert("L")) for f in sorted((OMNIGLOT / name).iterdir())[:10]])
               for name in chosen]
    return _write(out, classes, heldout=10)


def glyphs(out: Path) -> Path:
    """Letters and digits printed in each typeface matplotlib ships (one image per font), 48 px."""
    import matplotlib

    fonts = sorted((Path(matplotlib.get_data_path()) / "fonts/ttf").glob("*.ttf"))
    fonts = [f for f in fonts if not any(s in f.name for s in ("Siz", "NonUni", "LastResort", "cmex", "cmsy", "cmmi",
                                                                "Display"))]
    if len(fonts) < TRAIN + TEST:
        raise FileNotFoundError(f"only {len(fonts)} text fonts in matplotlib")
    order = np.random.default_rng(0).permutation(len(fonts))
    characters = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]

    def draw(character: str, font: Path) -> np.ndarray:
        image = Image.new("L", (48, 48), 255)
        face = ImageFont.truetype(str(font), 36)
        ImageDraw.Draw(image).text((24, 24), character, font=face, fill=0, anchor="mm")
        return np.asarray(image)

    rng = np.random.default_rng(1)
    classes = [(f"char_{c}", [draw(c, fonts[i]) for i in order[: TRAIN + TEST]]) for c in rng.permutation(characters)]
    return _write(out, classes, heldout=10)


def faces(out: Path) -> Path:
    """The Olivetti faces (40 subjects, 10 photos each, 64x64 greyscale), fetched by scikit-learn."""
    from sklearn.datasets import fetch_olivetti_faces

    data = fetch_olivetti_faces()
    images = (data.images * 255).astype(np.uint8)
    return _write(out, _by_class(images, data.target, [f"subject_{s:02d}" for s in range(40)], 40), heldout=10)


def objects(out: Path) -> Path:
    """40 CIFAR-100 classes (colour photos of objects, 32x32), 10 training images each, fetched by Keras."""
    import keras

    (images, labels), _ = keras.datasets.cifar100.load_data()
    return _write(out, _by_class(images, labels.ravel(), [f"class_{c:02d}" for c in range(100)], 40), heldout=10)


DATASETS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "digits": ("handwritten digits, 8 px grey (scikit-learn)", digits),
    "omniglot": ("handwritten characters, 105 px grey (Omniglot)", omniglot),
    "glyphs": ("printed characters, 48 px grey (20 typefaces)", glyphs),
    "faces": ("faces, 64 px grey (Olivetti)", faces),
    "objects": ("objects, 32 px colour (CIFAR-100)", objects),
}
SUMMARY = ("top1", "map_at_r")


def _figures(report: dict) -> dict:
    """The compared figures of a report (or of one baseline's section)."""
    figures = {key: report[key] for key in SUMMARY}
    for shots, result in report.get("fewshot", {}).items():
        figures[f"fewshot_{shots}"] = result["mean"]
        figures["n_way"] = result["n_way"]
    return figures


def measure(folder: Path, preset: str, overrides: dict) -> dict:
    """Train ``preset`` on ``folder``/train and score it with its baselines; returns the figures."""
    from pipelines.params import preset_config
    from siamese_core.config import Config, apply_overrides
    from siamese_core.data import scan_folder
    from siamese_core.evaluation import assess
    from siamese_core.recognizer import SiameseRecognizer, build_gallery
    from siamese_core.train import train

    config = apply_overrides(preset_config(Config(), preset), {"evaluate.fewshot_episodes": 300, **overrides})
    started = time.perf_counter()
    result = train(config, folder / "train", folder / "test", verbose=0)
    seconds = time.perf_counter() - started
    recognizer = SiameseRecognizer(result.embedding, build_gallery(result.embedding, result.train_folder,
                                                                   config.evaluate), config)
    assessment = assess(recognizer, scan_folder(folder / "test"), result.train_folder, scan_folder(folder / "heldout"))
    report = assessment.report.to_dict()
    return {
        "model": _figures(report),
        "raw_pixels": _figures(report["baseline_raw_pixels"]),
        "untrained": _figures(report["baseline_untrained"]),
        "open_set": report.get("open_set", {}),
        "train_seconds": round(seconds, 1),
        "epochs": len(next(iter(result.history.values()))),
        "kept_epoch": result.best_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--presets", default="fast-cpu,fewshot-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as siamese --set")
    parser.add_argument("--label", default="", help="a suffix for the preset's key in the results (e.g. before)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from siamese_core.config import parse_set_options

    overrides = parse_set_options(args.set)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.datasets.split(","):
        description, make = DATASETS[name]
        entry = results.setdefault(name, {})
        entry["description"] = description
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = make(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - no network, no file: report and go on
                entry["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                print(f"{name}: skipped ({entry['skipped']})", flush=True)
                args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
                continue
            entry.pop("skipped", None)
            entry["classes"] = {split: len(list((folder / split).iterdir())) for split in ("train", "heldout")}
            for preset in args.presets.split(","):
                key = preset + (f" ({args.label})" if args.label else "")
                entry.setdefault("presets", {})[key] = measure(folder, preset, overrides)
                print(name, key, json.dumps(entry["presets"][key]), flush=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
