"""Small-data benchmark across kinds of images: every preset against raw pixels and the untrained network.

Usage: python benchmarks/small_data.py [--datasets digits,omniglot,glyphs,faces,objects,photos,photo-halves]
       [--presets fast-cpu,fewshot-cpu,photos-cpu] [--set key=value ...] [--out benchmarks/results/small-data.json]

Each data set is written as the product's input (``train/``, ``test/`` and ``heldout/`` class folders,
PNG files) into a temporary folder, a recogniser is trained with each preset as ``siamese train``
trains it, and it is scored as the evaluate stage scores it (``siamese_core.evaluation.assess``):
top-1 and MAP@R of the test split against the training gallery, 1- and 5-shot episodes and the
open-set figures on the held-out classes, beside the same figures for nearest neighbour on raw pixels
and on the untrained network (for a pretrained backbone: its ImageNet weights under an untrained head). Top-1
comes with its 95 % Wilson interval over the test queries, few-shot accuracy with its 95 % half-width over
episodes. Results are merged into the JSON file by data set and preset; the documentation's
small-data table is generated from it (``python -m pipelines.doc_figures``).

The data sets (each: known classes with 8 training and 2 test images, 12 for the photos, plus held-out classes):
- digits: handwritten digits from scikit-learn (bundled, 8x8 greyscale; 7 known + 3 held-out classes).
- omniglot: 40 handwritten characters of ``../shared/datasets/omniglot-background-small`` (30 + 10).
- glyphs: printed letters and digits in the 20 typefaces matplotlib ships (26 + 10; one font is one image).
- faces: the Olivetti faces (AT&T), fetched by scikit-learn into its data folder (30 + 10 subjects).
- objects: CIFAR-100 training images, fetched by Keras into its cache (colour photos; 30 + 10 classes).
- photos: the 11 colour photographs that install with scikit-image (``pip install -c constraints.txt -e
  ".[bench]"``), scikit-learn and matplotlib, one class each (8 + 3). A class's "photos" are views of its one
  photograph: crops of 40-85 % of it anywhere in it, turned, mirrored, in other light. An instance-recognition
  set (which landmark, which product), not a set of object categories.
- photo-halves: the same, with each half of a photograph a class of its own (12 + 10): classes that share a
  scene's colours and light, as two monuments of one city do.
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
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from siamese_core.metrics import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared/datasets/omniglot-background-small"
RESULTS = ROOT / "benchmarks/results/small-data.json"
TRAIN, TEST = 8, 2  # images per known class; held-out classes keep TRAIN + TEST


def _write(out: Path, classes: list[tuple[str, list[np.ndarray]]], heldout: int, test: int = TEST) -> Path:
    """Write ``classes`` (name, images) as train/test (known) and heldout folders; the last ``heldout`` classes are
    held out. Each class keeps TRAIN + ``test`` images."""
    for rank, (name, images) in enumerate(classes):
        known = rank < len(classes) - heldout
        for i, image in enumerate(images[: TRAIN + test]):
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


PHOTO_TEST = 12  # test photos per known class: more queries, narrower intervals


def _scenes() -> list[tuple[str, np.ndarray]]:
    """The colour photographs that install with Python packages: scikit-image's (the ``bench`` extra),
    scikit-learn's and matplotlib's; one scene each (the motorcycle is the left view of a stereo pair)."""
    import skimage.data  # here, as each data set's source: without the extra, the photo sets are reported skipped
    from matplotlib.cbook import get_sample_data
    from sklearn.datasets import load_sample_image

    scenes = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "hubble_deep_field",
                                                              "immunohistochemistry", "retina", "rocket")}
    scenes["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    scenes |= {name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")}
    scenes["grace_hopper"] = np.asarray(Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    return sorted(scenes.items())


def _view(scene: np.ndarray, rng: np.random.Generator, side: int = 160) -> np.ndarray:
    """Another "photo" of a scene: a square crop of 40-85 % of its shorter side anywhere in it, turned by up to
    10 degrees, mirrored half the time, brightness, contrast and saturation each scaled by 0.7-1.3."""
    image = Image.fromarray(scene)
    height, width = scene.shape[:2]
    crop = rng.uniform(0.40, 0.85) * min(height, width) / 1.16  # a turned crop's corners stay inside the scene
    reach = 0.58 * crop
    cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
    image = image.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC, center=(cx, cy))
    image = image.crop((cx - crop / 2, cy - crop / 2, cx + crop / 2, cy + crop / 2)).resize((side, side),
                                                                                          Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    return np.asarray(image)


def photos(out: Path) -> Path:
    """11 photographed scenes (8 known, 3 held out), each seen in TRAIN + PHOTO_TEST views (:func:`_view`)."""
    rng = np.random.default_rng(0)
    scenes = _scenes()
    classes = [(name, [_view(scene, rng) for _ in range(TRAIN + PHOTO_TEST)])
               for name, scene in (scenes[i] for i in rng.permutation(len(scenes)))]
    return _write(out, classes, heldout=3, test=PHOTO_TEST)


def photo_halves(out: Path) -> Path:
    """Each half of each scene (left and right, or top and bottom) as a class of its own, seen in TRAIN + PHOTO_TEST
    views inside it (:func:`_view`): the halves of 6 scenes known (12 classes), of the other 5 held out (10)."""
    rng = np.random.default_rng(1)
    pairs = []
    for name, scene in _scenes():
        height, width = scene.shape[:2]
        halves = ((scene[:, : width // 2], scene[:, width // 2 :]) if width >= height
                  else (scene[: height // 2], scene[height // 2 :]))
        pairs.append([(f"{name}_{side}", [_view(half, rng) for _ in range(TRAIN + PHOTO_TEST)])
                      for side, half in zip(("a", "b"), halves)])
    return _write(out, [half for i in rng.permutation(len(pairs)) for half in pairs[i]], heldout=10, test=PHOTO_TEST)


DATASETS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "digits": ("handwritten digits, 8 px grey (scikit-learn)", digits),
    "omniglot": ("handwritten characters, 105 px grey (Omniglot)", omniglot),
    "glyphs": ("printed characters, 48 px grey (20 typefaces)", glyphs),
    "faces": ("faces, 64 px grey (Olivetti)", faces),
    "objects": ("objects, 32 px colour (CIFAR-100)", objects),
    "photos": ("photographed scenes, 160 px colour (scikit-image, scikit-learn, matplotlib)", photos),
    "photo-halves": ("halves of photographed scenes, 160 px colour (the same photos)", photo_halves),
}
SUMMARY = ("top1", "map_at_r")


def _figures(report: dict, queries: int) -> dict:
    """The compared figures of a report (or of one baseline's section) on ``queries`` test images: top-1 with its
    interval, MAP@R, and each few-shot mean with its 95 % half-width over episodes."""
    figures = {key: report[key] for key in SUMMARY}
    figures["top1_interval"] = [round(bound, 4) for bound in wilson_interval(report["top1"], queries)]
    for shots, result in report.get("fewshot", {}).items():
        figures[f"fewshot_{shots}"] = result["mean"]
        figures[f"fewshot_{shots}_ci95"] = result["ci95"]
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
    queries = report["n_queries"]
    return {
        "model": _figures(report, queries),
        "raw_pixels": _figures(report["baseline_raw_pixels"], queries),
        "untrained": _figures(report["baseline_untrained"], queries),
        "queries": queries,
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
