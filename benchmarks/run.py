"""Speed benchmark: every stage of the library beside a straightforward reference, in one run.

Usage: python -m benchmarks.run [--data DIR] [--config seed small] [--quick] [--out FILE]

``--data`` is a folder with ``train/`` and ``test/`` class folders; without it a seeded
photo-like dataset is generated (12 classes, 8-10 JPEGs each, up to 3000x2000).
Prints a table and writes the figures as JSON. Timings on a shared machine are noisy:
read the ratios, each measured against its reference in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from benchmarks import reference
from benchmarks.synthetic import make_landmarks
from siamese_core.config import Config, apply_overrides
from siamese_core.data import decode_image, scan_folder
from siamese_core.embed import decode_all, embed_images
from siamese_core.model import build_embedding_model
from siamese_core.recognizer import SiameseRecognizer, build_gallery
from siamese_core.train import make_optimizer, mine_triplets, train
from siamese_core.triplets import generate_triplets

CONFIGS = {
    "seed": {"weights": None},  # ResNet50 at 200x200, frozen before conv5_block1_out
    "small": {"weights": None, "backbone": "small_cnn", "input_size": 96},
}
LATENCY_GALLERY_ROWS = 10_000


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def timed(function, *args, **kwargs):
    """``(result, seconds)``."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def best_of(repeats: int, function, *args, **kwargs):
    """``(result, fastest seconds)`` over ``repeats`` calls: for stages of milliseconds, where one
    call mostly measures first-call overheads and scheduler noise."""
    runs = [timed(function, *args, **kwargs) for _ in range(repeats)]
    return runs[-1][0], min(seconds for _, seconds in runs)


def row(stage: str, library: float, ref: float, unit: str, ratio: float, note: str = "") -> dict:
    """One table row; ``ratio`` > 1 means the library is better."""
    return {"stage": stage, "library": library, "reference": ref, "unit": unit, "ratio": ratio, "note": note}


def _table_index(table, folder) -> np.ndarray:
    position = {p: i for i, p in enumerate(folder.paths)}
    return np.array([[position[p] for p in r] for r in table[["anchor", "positive", "negative"]].itertuples(index=False)])


def bench_mining(config: Config, folder, model) -> tuple[list[dict], object]:
    """Hard-negative triplet generation, with and without the embedding pass."""
    size = config.model.input_size
    ref_embeddings, ref_embed_s = timed(reference.embed_one_by_one, model, folder.paths, size)
    ref_index, ref_pairs_s = best_of(3, reference.hard_triplets_pair_by_pair, folder.labels, ref_embeddings)
    table, lib_pairs_s = best_of(3, generate_triplets, folder, "hard", embeddings=ref_embeddings,
                                 max_pairs_per_class=config.triplets.max_pairs_per_class)
    same = np.array_equal(np.sort(_table_index(table, folder), axis=0), np.sort(ref_index, axis=0))
    hard = apply_overrides(config, {"strategy": "hard"})
    model.predict_on_batch(np.zeros((64, size, size, 3), np.float32))  # trace the batch shape once
    mined, lib_mine_s = timed(mine_triplets, hard, folder, model)
    rows = [
        row("triplet generation, embeddings given", lib_pairs_s, ref_pairs_s, "s", ref_pairs_s / lib_pairs_s,
            f"{len(table)} triplets, same as reference: {same}; fastest of 3 calls each"),
        row("triplet mining incl. embedding", lib_mine_s, ref_embed_s + ref_pairs_s, "s",
            (ref_embed_s + ref_pairs_s) / lib_mine_s, f"{len(folder)} images"),
    ]
    return rows, (mined, ref_embed_s)


def bench_training(config: Config, train_dir, folder, triplets, epochs: int, ref_steps: int) -> tuple[list[dict], dict]:
    """Library epochs (all fast paths) against three-pass steps through the whole network."""
    timer = EpochTimer()
    run_config = apply_overrides(config, {"epochs": epochs})
    result, total_s = timed(train, run_config, train_dir, None, triplets, callbacks=[timer], verbose=0)
    steady = float(np.median(timer.seconds[1:] or timer.seconds))
    setup = total_s - sum(timer.seconds)

    keras.utils.set_random_seed(config.train.seed)
    embedding = build_embedding_model(config.model)
    step = reference.three_pass_trainer(embedding, make_optimizer(config.train), config.model.margin)
    images = decode_all(folder.paths, config.model.input_size)
    index = np.random.default_rng(0).permutation(_table_index(triplets, folder))
    batch = config.train.batch_size
    seconds = []
    for i in range(ref_steps + 1):
        rows = index[(i * batch) % len(index):][:batch]
        start = time.perf_counter()
        float(step(*(images[rows[:, j]].astype(np.float32) for j in range(3))))
        seconds.append(time.perf_counter() - start)
    ref_epoch = float(np.mean(seconds[1:])) * -(-len(index) // batch)
    n = len(triplets)
    amortised = (setup + 10 * steady) / 10
    rows_out = [
        row("training epoch (steady)", steady, ref_epoch, "s", ref_epoch / steady,
            f"{n / steady:.1f} triplets/s, {3 * n / steady:.1f} images/s (ref {n / ref_epoch:.1f} triplets/s, "
            f"estimated from {ref_steps} steps)"),
        row("training, per epoch over 10 incl. setup", amortised, ref_epoch, "s", ref_epoch / amortised,
            f"setup (decode + frozen-trunk cache) {setup:.1f} s, first epoch {timer.seconds[0]:.1f} s"),
    ]
    return rows_out, {"result": result, "epoch_seconds": timer.seconds, "setup_s": setup}


def bench_embedding(config: Config, folder, model) -> list[dict]:
    """Gallery embedding from files and from decoded arrays, against plain ``model.predict``."""
    size, batch = config.model.input_size, config.evaluate.embed_batch_size
    decoded = decode_all(folder.paths, size)
    floats = decoded.astype(np.float32)
    model.predict(floats[:batch], batch_size=batch, verbose=0)
    model.predict_on_batch(floats[:batch])
    _, plain_s = timed(model.predict, floats, batch_size=batch, verbose=0)
    _, files_s = timed(build_gallery, model, folder, batch)
    _, arrays_s = timed(embed_images, model, list(decoded), batch)
    _, decode_s = timed(decode_all, folder.paths, size)
    n = len(folder)
    return [
        row("gallery embedding from JPEG files", n / files_s, n / plain_s, "images/s", plain_s / files_s,
            f"reference: model.predict on decoded arrays; decoding alone {n / decode_s:.0f} images/s"),
        row("gallery embedding from decoded arrays", n / arrays_s, n / plain_s, "images/s", plain_s / arrays_s,
            "reference: model.predict"),
    ]


def bench_prediction(config: Config, folder, test_folder, model, ref_embed_s: float, calls: int,
                     workdir: Path) -> list[dict]:
    """Warm single-image latency on a 10k-row gallery, cold CLI, batch prediction."""
    size = config.model.input_size
    gallery = build_gallery(model, folder, config.evaluate.embed_batch_size)
    rng = np.random.default_rng(0)
    extra = LATENCY_GALLERY_ROWS - len(gallery)
    big = gallery.extend(rng.normal(size=(extra, gallery.embeddings.shape[1])).astype(np.float32),
                         [f"synthetic {i % 1000}" for i in range(extra)], [f"synthetic/{i}" for i in range(extra)])
    recognizer = SiameseRecognizer(model, big, config)
    queries = test_folder.paths
    for path in queries[:3]:
        recognizer.predict_one(path)
    latencies, parts = [], {"decode": [], "embed": [], "search": []}
    for i in range(calls):
        path = queries[i % len(queries)]
        latencies.append(timed(recognizer.predict_one, path)[1] * 1000)
        image, decode_s = timed(decode_image, path, size)
        vector, embed_s = timed(recognizer.embed, [image])
        parts["decode"].append(decode_s * 1000)
        parts["embed"].append(embed_s * 1000)
        parts["search"].append(timed(big.search, vector)[1] * 1000)
    p50, p95 = np.percentile(latencies, [50, 95])
    breakdown = ", ".join(f"{k} {np.median(v):.1f}" for k, v in parts.items())

    bundle = SiameseRecognizer(model, gallery, config).save(workdir / "bundle")

    def reference_predict(path):
        loaded = keras.saving.load_model(bundle / "model.keras", compile=False)
        embeddings = reference.embed_one_by_one(loaded, folder.paths, size)
        return reference.nearest_one_by_one(reference.embed_one_by_one(loaded, [path], size)[0], embeddings,
                                            folder.labels)

    _, ref_predict_s = timed(reference_predict, queries[0])
    cli = [str(Path(sys.executable).parent / "siamese"), "predict", "--model", str(bundle), queries[0], "--json"]
    cold = timed(subprocess.run, cli, capture_output=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})[1]

    small = SiameseRecognizer(model, gallery, config)
    small.predict(queries[:2])
    _, batch_s = timed(small.predict, queries)
    embeddings = gallery.embeddings

    def reference_batch():
        for path in queries:
            vector = model.predict(decode_image(path, size)[None].astype(np.float32), verbose=0)[0]
            reference.nearest_one_by_one(vector, embeddings, gallery.labels)

    _, ref_batch_s = timed(reference_batch)
    n = len(queries)
    return [
        row("warm single prediction p50", p50, ref_predict_s * 1000, "ms", ref_predict_s * 1000 / p50,
            f"p95 {p95:.1f} ms; gallery {len(big)} rows ({len(gallery)} real); median ms: {breakdown}; "
            "reference reloads the model and re-embeds the gallery one image at a time"),
        row("cold CLI prediction (siamese predict)", cold * 1000, ref_predict_s * 1000, "ms", ref_predict_s / cold,
            f"{len(gallery)}-image gallery bundle, one image, includes Python and TensorFlow start-up"),
        row("batch prediction", n / batch_s, n / ref_batch_s, "images/s", ref_batch_s / batch_s,
            f"{n} test images; reference: one image per forward pass, gallery compared row by row "
            f"(one-by-one gallery embedding took {ref_embed_s:.1f} s)"),
    ]


def bench_config(name: str, train_dir: Path, test_dir: Path, quick: bool, workdir: Path) -> dict:
    """Every stage for one config."""
    config = apply_overrides(Config(), CONFIGS[name])
    keras.utils.set_random_seed(config.train.seed)
    folder, test_folder = scan_folder(train_dir), scan_folder(test_dir)
    model = build_embedding_model(config.model)
    rows, (triplets, ref_embed_s) = bench_mining(config, folder, model)
    train_rows, trained = bench_training(config, train_dir, folder, triplets, 2 if quick else 3, 2 if quick else 3)
    rows += train_rows
    embedding = trained["result"].embedding
    rows += bench_embedding(config, folder, embedding)
    rows += bench_prediction(config, folder, test_folder, embedding, ref_embed_s, 10 if quick else 30, workdir / name)
    return {"config": CONFIGS[name], "rows": rows, "epoch_seconds": trained["epoch_seconds"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def subprocess_json(module: str, *args: str) -> dict:
    """Run ``python -m module args`` and parse the JSON it prints last."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What the figures were measured on."""
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "load_average_at_start": os.getloadavg()}


def goals(report: dict) -> list[dict]:
    """Each goal with its figure and whether it is met."""
    out = []
    seed, small = report["configs"].get("seed"), report["configs"].get("small")

    def figure(cfg, stage, key="ratio"):
        return next(r[key] for r in cfg["rows"] if r["stage"] == stage)

    for cfg_name, cfg in (("seed", seed), ("small", small)):
        if cfg is None:
            continue
        out.append({"goal": f"[{cfg_name}] triplet generation >= 50x reference",
                    "figure": f"{figure(cfg, 'triplet generation, embeddings given'):.0f}x (embeddings given), "
                              f"{figure(cfg, 'triplet mining incl. embedding'):.1f}x incl. the embedding pass",
                    "met": bool(figure(cfg, "triplet generation, embeddings given") >= 50)})
        out.append({"goal": f"[{cfg_name}] training epoch >= 10x reference",
                    "figure": f"{figure(cfg, 'training epoch (steady)'):.1f}x steady, "
                              f"{figure(cfg, 'training, per epoch over 10 incl. setup'):.1f}x over 10 epochs incl. setup",
                    "met": bool(figure(cfg, "training epoch (steady)") >= 10)})
        out.append({"goal": f"[{cfg_name}] gallery embedding >= 90% of model.predict",
                    "figure": f"{100 * figure(cfg, 'gallery embedding from JPEG files'):.0f}% from files, "
                              f"{100 * figure(cfg, 'gallery embedding from decoded arrays'):.0f}% from arrays",
                    "met": bool(figure(cfg, "gallery embedding from JPEG files") >= 0.9)})
    if small is not None:
        p50 = figure(small, "warm single prediction p50", "library")
        out.append({"goal": "[small] warm single prediction < 50 ms, 10k gallery", "figure": f"p50 {p50:.1f} ms",
                    "met": bool(p50 < 50)})
    ann = report.get("ann")
    if ann:
        good = [s for s in ann["sweep"] if s["recall_at_1"] >= 0.99]
        best = min(good, key=lambda s: s["p50_ms"]) if good else None
        out.append({"goal": f"search {ann['rows']:,} x {ann['dim']} < 10 ms/query at recall@1 >= 0.99",
                    "figure": (f"nprobe {best['nprobe']}: p50 {best['p50_ms']:.2f} ms, p95 {best['p95_ms']:.2f} ms, "
                               f"recall@1 {best['recall_at_1']:.3f}; exact {ann['exact_p50_ms']:.0f} ms; "
                               f"build {ann['build_s']:.0f} s") if best else "no nprobe reached recall 0.99",
                    "met": bool(best and best["p50_ms"] < 10)})
    memory = report.get("memory")
    if memory:
        lib = {m["images"]: m["peak_rss_mb"] - m["rss_before_mb"] for m in memory if m["mode"] == "library"}
        ref = {m["images"]: m["peak_rss_mb"] - m["rss_before_mb"] for m in memory if m["mode"] == "reference"}
        small_n, big_n = min(lib), max(lib)
        out.append({"goal": "memory flat in dataset size (embed + evaluate)",
                    "figure": f"library +{lib[small_n]:.0f} MB at {small_n}, +{lib[big_n]:.0f} MB at {big_n} images; "
                              f"reference +{ref[small_n]:.0f} / +{ref[big_n]:.0f} MB",
                    "met": bool(lib[big_n] < 2 * lib[small_n] + 50)})
    return out


def print_table(report: dict) -> None:
    """The figures as a fixed-width table."""
    print(f"\nmachine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['memory_gb']} GB; TF {report['machine']['tensorflow']}")
    for name, cfg in report["configs"].items():
        print(f"\n[{name}] {cfg['config']}  peak RSS {cfg['peak_rss_mb']:.0f} MB")
        print(f"{'stage':42} {'library':>12} {'reference':>12} {'unit':>9} {'ratio':>8}")
        for r in cfg["rows"]:
            print(f"{r['stage']:42} {r['library']:12.3f} {r['reference']:12.3f} {r['unit']:>9} {r['ratio']:7.1f}x")
            if r["note"]:
                print(f"{'':4}{r['note']}")
    for m in report.get("memory", []):
        print(f"memory {m['mode']:9} {m['images']:6} images: peak RSS {m['peak_rss_mb']:.0f} MB "
              f"(+{m['peak_rss_mb'] - m['rss_before_mb']:.0f} MB after model load), {m['seconds']:.1f} s")
    if report.get("ann"):
        ann = report["ann"]
        print(f"\nsearch {ann['rows']:,} x {ann['dim']}: {ann['index']}, build {ann['build_s']:.1f} s, "
              f"exact p50 {ann['exact_p50_ms']:.1f} ms, peak RSS {ann['peak_rss_mb']:.0f} MB")
        for s in ann["sweep"]:
            print(f"  nprobe {s['nprobe']:3}: recall@1 {s['recall_at_1']:.3f}  p50 {s['p50_ms']:.2f} ms  p95 {s['p95_ms']:.2f} ms")
    print("\ngoals:")
    for g in report["goals"]:
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['figure']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with train/ and test/ class folders")
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["seed", "small"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller memory and search runs")
    parser.add_argument("--skip", nargs="*", choices=["memory", "ann"], default=[])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args()

    report: dict = {"machine": machine(), "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
                    "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.data:
            train_dir, test_dir = args.data / "train", args.data / "test"
        else:
            (train_dir, test_dir), gen_s = timed(make_landmarks, workdir / "data")
            print(f"generated the landmark dataset in {gen_s:.1f} s", flush=True)
        for name in args.config:
            print(f"benchmarking [{name}] ...", flush=True)
            report["configs"][name] = bench_config(name, train_dir, test_dir, args.quick, workdir)
    if "memory" not in args.skip:
        sizes = (500, 5000) if args.quick else (1000, 10000)
        report["memory"] = [subprocess_json("benchmarks.memory", "--images", str(n), "--mode", mode)
                            for n in sizes for mode in ("library", "reference")]
    if "ann" not in args.skip:
        report["ann"] = subprocess_json("benchmarks.ann", "--rows", "200000" if args.quick else "1000000")
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["goals"] = goals(report)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
