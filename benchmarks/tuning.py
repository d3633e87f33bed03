"""Tuning against the best preset: ``siamese tune`` for N minutes on a small data set, then the winner and every
compared preset on the same validation objective, and the winner on the test split and held-out classes.

    python -m benchmarks.tuning --minutes 3 --sets digits

Writes benchmarks/results/tuning.json. The small-data sets are those of benchmarks/small_data.py (digits: scikit-
learn's handwritten digits; classes 0-6 to train and test, 7-9 held out).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipelines.files import write_json
from pipelines.tuning import OBJECTIVE, tune
from tests.support.images import make_digits_dataset

RESULTS = Path(__file__).parent / "results" / "tuning.json"


def digits(root: Path) -> tuple[Path, Path, Path]:
    """Digits 0-6 (40 training and 10 test images each) and held-out digits 7-9, at 32 px."""
    train, test = make_digits_dataset(root / "known", classes=7, train_per_class=40, test_per_class=10)
    heldout, _ = make_digits_dataset(root / "new", classes=3, train_per_class=20, test_per_class=0, first=7)
    return train, test, heldout


SETS = {"digits": digits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--presets", nargs="+", default=["fast-cpu", "fewshot-cpu"],
                        help="compared presets (photos-cpu's 224 px network is slow on 2 cores)")
    args = parser.parse_args()
    results = {"minutes": args.minutes, "cores": os.cpu_count(), "objective": OBJECTIVE, "sets": {}}
    for name in args.sets:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
            train, test, heldout = SETS[name](root)
            start = time.time()
            result = tune(train, root / "tuned.yaml", args.minutes, test_dir=test, heldout_dir=heldout,
                          presets=tuple(args.presets), workdir=root / "work", progress=False)
            results["sets"][name] = {"seconds": round(time.time() - start, 1), "winner": result.best,
                                     "presets": result.presets, "final": result.final,
                                     "trials": len(result.trials)}
            print(json.dumps(results["sets"][name], indent=1, default=str))
    write_json(RESULTS, results)


if __name__ == "__main__":
    main()
