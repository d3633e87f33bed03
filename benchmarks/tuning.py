"""Tuning against the best preset: ``siamese tune`` for N minutes on a small data set, then the winner and the best
compared preset on the same validation objective, and both trained on the whole training folder and scored on the
test split (top-1) and the held-out classes (1-shot).

    python -m benchmarks.tuning --minutes 20 --sets digits photo-halves
    python -m benchmarks.tuning --minutes 30 --sets omniglot-class --presets fewshot-cpu \
        --out benchmarks/results/tuning-omniglot-class.json

Merges each set's result into benchmarks/results/tuning.json; ``python -m pipelines.doc_figures`` puts its table in
docs/how-to/tuning.md. ``digits`` is scikit-learn's handwritten digits with 40 training images a class (0-6 to train
and test, 7-9 held out); the other sets are those of benchmarks/small_data.py (8 training images a class), where
the colour-photo sets also compare the preset ``photos-cpu``. ``omniglot-class`` is the Omniglot class split of
benchmarks/omniglot.py (202 classes to train on, 40 held out), for the goal of 30 minutes of tuning, then the winner
trained within 15, reaching 95 % 20-way 1-shot on the held-out classes (``final.tuned.train_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.omniglot import DEFAULT_DATA as OMNIGLOT
from benchmarks.omniglot import split
from benchmarks.small_data import DATASETS
from pipelines.files import read_json, write_json
from pipelines.tuning import (
    OBJECTIVE,
    SEARCH_SPACE,
    STUDY_SCHEMA,
    base_params,
    final_scores,
    preset_point,
    trial_params,
    tune,
)
from tests.support.images import make_digits_dataset

RESULTS = Path(__file__).parent / "results" / "tuning.json"


def digits(root: Path) -> tuple[Path, Path, Path]:
    """Digits 0-6 (40 training and 10 test images each) and held-out digits 7-9, at 32 px."""
    train, test = make_digits_dataset(root / "known", classes=7, train_per_class=40, test_per_class=10)
    heldout, _ = make_digits_dataset(root / "new", classes=3, train_per_class=20, test_per_class=0, first=7)
    return train, test, heldout


def omniglot_class_split(root: Path) -> tuple[Path, Path, Path]:
    """The Omniglot class split of benchmarks/omniglot.py: 40 classes drawn at random held out (20 images each), the
    other 202 with 14 training and 6 test images each."""
    if not OMNIGLOT.is_dir():
        raise SystemExit(f"{OMNIGLOT}: dataset not found")
    folders = split(OMNIGLOT, root / "data", train_per_class=14, heldout_classes=40, by="class")
    return folders["train"], folders["test"], folders["heldout"]


def _small_data_set(build):
    """A set of benchmarks/small_data.py as (train, test, heldout) folders."""

    def folders(root: Path) -> tuple[Path, Path, Path]:
        out = build(root / "data")
        return out / "train", out / "test", out / "heldout"

    return folders


SETS = ({"digits": digits} | {name: _small_data_set(build) for name, (_, build) in DATASETS.items() if name != "digits"}
        | {"omniglot-class": omniglot_class_split})
PHOTO_SETS = {"objects", "photos", "photo-halves"}  # colour photos: photos-cpu is compared too


def best_preset(presets: dict[str, dict | None]) -> str:
    """The compared preset with the highest validation objective among those that completed."""
    complete = {name: row for name, row in presets.items() if row and row["state"] == "COMPLETE"}
    return max(complete, key=lambda name: complete[name]["objective"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--presets", nargs="+", default=["fast-cpu", "fewshot-cpu"],
                        help="compared presets; the colour-photo sets add photos-cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (its sets of the same minutes "
                        "are kept)")
    args = parser.parse_args()
    earlier = read_json(args.out) if args.out.is_file() else {}
    results = {"minutes": args.minutes, "cores": os.cpu_count(), "objective": OBJECTIVE,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other work, Python "
                          f"{platform.python_version()}",
               "sets": earlier.get("sets", {}) if earlier.get("minutes") == args.minutes else {}}
    for name in args.sets:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
            os.environ["SIAMESE_TUNING_STORAGE"] = f"sqlite:///{root / 'optuna.db'}"
            train, test, heldout = SETS[name](root)
            start = time.time()
            presets = tuple(args.presets) + (("photos-cpu",) if name in PHOTO_SETS else ())
            result = tune(train, root / "tuned.yaml", args.minutes, test_dir=test, heldout_dir=heldout,
                          presets=tuple(dict.fromkeys(presets)), workdir=root / "work", progress=False)
            seconds = round(time.time() - start, 1)
            preset = best_preset(result.presets)
            if result.best["preset"] == preset:  # the winner is that preset's trial: the same training
                preset_final = result.final
            else:
                base = base_params(None)
                params = trial_params(base, preset_point(preset, base, SEARCH_SPACE) or {}, {}, preset)
                preset_final = final_scores(params, train, test, heldout)
            results["sets"][name] = {"seconds": seconds, "trials": len(result.trials), "study_schema": STUDY_SCHEMA,
                                     "winner": result.best,
                                     "kept_preset": result.kept_preset, "presets": result.presets, "best_preset": preset,
                                     "final": {"tuned": result.final, "best_preset": preset_final}}
            print(json.dumps(results["sets"][name], indent=1, default=str))
            write_json(args.out, results)  # after each set: a long run keeps what it finished


if __name__ == "__main__":
    main()
