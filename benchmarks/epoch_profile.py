"""Where one online-mining epoch goes: the batch pipeline, augmentation, the train step, the few-shot callback.

Usage: python benchmarks/epoch_profile.py [--data DIR] [--preset fast-cpu] [--steps N] [--set key=value ...]
Trains on the benchmark's alphabet split (``benchmarks/omniglot.py``) and prints one JSON object of
seconds per step for each part, measured one at a time on this machine, and the share of an epoch
each would take.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.omniglot import DEFAULT_DATA, split
from pipelines.params import preset_config
from siamese_core.batches import pk_batches, pk_dataset
from siamese_core.callbacks import FewShotEvaluation
from siamese_core.config import Config, apply_overrides, parse_set_options
from siamese_core.data import scan_folder
from siamese_core.embed import decode_all
from siamese_core.model import build_embedding_model
from siamese_core.train import _augmenter, _plan, _prepare_data, make_optimizer


def seconds_per_step(iterate, steps: int) -> float:
    """Mean seconds of ``iterate()`` over ``steps`` calls, after two warm-up calls."""
    for _ in range(2):
        iterate()
    start = time.perf_counter()
    for _ in range(steps):
        iterate()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preset", default="fast-cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = apply_overrides(preset_config(Config(), args.preset), parse_set_options(args.overrides))
    p, k = config.train.classes_per_batch, config.train.images_per_class
    with tempfile.TemporaryDirectory() as tmp:
        folders = split(args.data, Path(tmp), 20, 40, "alphabet")
        embedding = build_embedding_model(config.model)
        plan = _plan(config, embedding)
        start = time.perf_counter()
        data = _prepare_data(config, plan, folders["train"], None, None, None)
        decode_seconds = time.perf_counter() - start
        held = scan_folder(folders["heldout"])
        held_images = decode_all(held.paths, config.model.input_size)
    steps_per_epoch = -(-len(data.inputs) // (p * k))
    rows = pk_batches(data.labels, p, k, args.steps + 2, seed=0)

    def pipeline(augment):
        batches = iter(pk_dataset(data.inputs, data.labels, lambda: iter(rows), len(rows), augment=augment))
        return lambda: next(batches)

    images, labels = pipeline(None)()
    model = plan.model
    model.compile(optimizer=make_optimizer(config.train, steps_per_epoch))
    model.make_train_function()
    step = model.train_function
    batch = iter([(images, labels)] * (args.steps + 2))
    per_step = {
        "gather": seconds_per_step(pipeline(None), args.steps),
        "gather_and_augment": seconds_per_step(pipeline(_augmenter(config)), args.steps),
        "train_step": seconds_per_step(lambda: step(batch), args.steps),
    }
    callback = FewShotEvaluation(embedding, held_images, held.labels, n_way=config.evaluate.fewshot_way)
    start = time.perf_counter()
    callback.on_epoch_end(0, {})
    fewshot_seconds = time.perf_counter() - start
    epoch = {name: seconds * steps_per_epoch for name, seconds in per_step.items()}
    epoch["fewshot_callback"] = fewshot_seconds
    report = {
        "config": {"input_size": config.model.input_size, "P": p, "K": k, "augment": config.train.augment.model_dump()},
        "training_images": len(data.inputs), "steps_per_epoch": steps_per_epoch,
        "decode_once_seconds": round(decode_seconds, 2),
        "seconds_per_step": {name: round(s, 4) for name, s in per_step.items()},
        "seconds_per_epoch_if_alone": {name: round(s, 1) for name, s in epoch.items()},
        "augment_seconds_per_epoch": round(epoch["gather_and_augment"] - epoch["gather"], 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
