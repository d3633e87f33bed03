"""Pack the demo dataset: a small slice of Omniglot as pipelines/demo/omniglot-slice.npz.

Usage: python benchmarks/make_demo_slice.py [--source DIR] [--out FILE]

The slice has 40 "known" classes (10 from each of four alphabets; the demo trains on
14 drawings of each and tests on the other 6) and 20 "held-out" classes from the Latin
alphabet (the lower-case letters a-t), which the demo never trains on. Greek is left out:
several of its letters look like Latin ones, so training on it would leak held-out classes.
Every drawing is stored as 32x32 uint8 greyscale (white background, dark strokes).
The result depends only on the source files: classes and files are taken in sorted order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared/datasets/omniglot-background-small"
DEFAULT_OUT = ROOT / "pipelines/demo/omniglot-slice.npz"
KNOWN = {"Early_Aramaic": 10, "Japanese_(katakana)": 10, "Korean": 10, "Sanskrit": 10}
HELDOUT = {"Latin": 20}
IMAGES_PER_CLASS = 20
SIZE = 32


def load_class(folder: Path) -> np.ndarray:
    """The drawings of one class folder, sorted by file name, as (20, SIZE, SIZE) uint8."""
    files = sorted(folder.glob("*.png"))
    if len(files) != IMAGES_PER_CLASS:
        raise SystemExit(f"{folder}: expected {IMAGES_PER_CLASS} PNG files, found {len(files)}")
    images = []
    for f in files:
        with Image.open(f) as image:
            small = image.convert("L").resize((SIZE, SIZE), Image.Resampling.BOX)
        images.append(np.asarray(small, dtype=np.uint8))
    return np.stack(images)


def choose(source: Path, alphabets: dict[str, int]) -> list[Path]:
    """The first N class folders (sorted by name) of each alphabet."""
    chosen = []
    for alphabet, count in alphabets.items():
        folders = sorted(d for d in source.iterdir() if d.is_dir() and d.name.split("__")[0] == alphabet)
        if len(folders) < count:
            raise SystemExit(f"{source}: alphabet {alphabet} has {len(folders)} classes, {count} needed")
        chosen.extend(folders[:count])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: Omniglot folder not found")
    known, heldout = choose(args.source, KNOWN), choose(args.source, HELDOUT)
    folders = known + heldout
    names = [f.name for f in folders]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        images=np.stack([load_class(f) for f in folders]),
        classes=np.array(names, dtype=f"<U{max(map(len, names))}"),
        alphabets=np.array([n.split("__")[0] for n in names], dtype="<U32"),
        heldout=np.array([f in heldout for f in folders]),
    )
    print(f"{args.out}: {len(known)} known + {len(heldout)} held-out classes, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
