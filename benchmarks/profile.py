"""Profile the library's training call (the slowest stage) with cProfile.

Usage: python -m benchmarks.profile [--data DIR] [--config seed|small] [--epochs N]
Prints the functions with the most own time and the biggest cumulative callers.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.run import CONFIGS
from benchmarks.synthetic import make_landmarks
from siamese_core.config import Config, apply_overrides
from siamese_core.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="seed")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    config = apply_overrides(Config(), {**CONFIGS[args.config], "epochs": args.epochs, "strategy": "hard"})
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = args.data / "train" if args.data else make_landmarks(tmp)[0]
        profiler = cProfile.Profile()
        profiler.runcall(train, config, train_dir, None, verbose=0)
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
