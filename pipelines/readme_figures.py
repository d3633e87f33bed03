"""The README's measured figures, generated so that they never drift from what a run measured.

``python -m pipelines.readme_figures`` rewrites the blocks between markers in README.md: the demo
table from the metrics.json that ``dvc repro`` wrote, and the learning-quality tables from the
JSON reports of ``benchmarks/omniglot.py`` and ``benchmarks/enrolment_levers.py`` kept in
``benchmarks/results/``. A test fails when README and sources disagree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- demo figures: generated from metrics.json by python -m pipelines.readme_figures -->", \
    "<!-- end of demo figures -->"
QUALITY_START, QUALITY_END = ("<!-- learning quality: generated from benchmarks/results/ by python -m pipelines.readme_figures -->",
                              "<!-- end of learning quality -->")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COLUMNS = ("", "baseline_raw_pixels.", "baseline_untrained.")


def _percent(metrics: dict, key: str) -> str:
    mean, interval = metrics.get(f"{key}.mean", metrics.get(key)), metrics.get(f"{key}.ci95")
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} %" + (f" ± {100 * interval:.1f}" if interval is not None else "")


def render(metrics: dict) -> str:
    """The demo table and the unknown-class sentence, from the flat metrics of an evaluate stage."""
    rows = [
        (f"known classes: top-1 on the test split ({metrics['n_queries']} queries)", "top1", _percent),
        ("known classes: MAP@R", "map_at_r", lambda m, k: f"{m[k]:.3f}" if k in m else "-"),
    ]
    for shots in (1, 5):
        key = f"fewshot.{shots}shot"
        if f"{key}.mean" in metrics:
            rows.append((f"held-out classes: {metrics[f'{key}.n_way']}-way {shots}-shot "
                         f"({metrics[f'{key}.episodes']} episodes)", key, _percent))
    lines = ["| | trained network | raw pixels | untrained network |", "|---|---|---|---|"]
    for title, key, fmt in rows:
        cells = [fmt(metrics, prefix + key) for prefix in COLUMNS]
        lines.append(f"| {title} | **{cells[0]}** | {cells[1]} | {cells[2]} |")
    if "open_set.auroc" in metrics:
        lines += ["", f"Telling a held-out class from the known ones is harder. The AUROC of the nearest distance "
                      f"is {metrics['open_set.auroc']:.3f}; at the calibrated threshold "
                      f"({metrics.get('calibration.threshold', float('nan')):.4f}, best F1, its figures cross-fitted "
                      f"on the test queries) {100 * metrics['open_set.known_accepted']:.1f} % of known queries are "
                      f"accepted and {100 * metrics['open_set.unknown_rejected']:.1f} % of held-out images rejected."]
    return "\n".join([START, *lines, END])


# Held out by alphabet, one option at a time: (option, report file, lever key or None for the report's
# "trained" figures, views whose query time applies). Lever rows use the network of alphabet-fast-cpu.json
# (the ensembles add that of alphabet-average-pooling.json).
OPTIONS = [
    ("`fast-cpu` before this round: four augmentation layers in a row, average pooling",
     "alphabet-four-augmentation-layers.json", None, 1),
    ("one affine transform per batch instead (20 epochs)", "alphabet-average-pooling.json", None, 1),
    ("that, with input 112 px and a stride-2 first convolution", "alphabet-stem-112px-stride-2.json", None, 1),
    ("that, with generalized-mean (GeM) pooling instead of average", "alphabet-gem-20-epochs.json", None, 1),
    ("**`fast-cpu` now**: one affine transform, GeM pooling, 18 epochs", "alphabet-fast-cpu.json", None, 1),
    ("+ test-time views: the image and 4 shifted copies", "alphabet-levers.json", "tta_5_views", 5),
    ("+ test-time views: the image and 8 shifted copies", "alphabet-levers.json", "tta_9_views", 9),
    ("+ 5 views of the enrolled images only", "alphabet-levers.json", "tta_5_views_enrolled_side_only", 1),
    ("+ each enrolled image augmented into 16 random copies, averaged", "alphabet-levers.json",
     "one_image_augmented_16x_enrolled_side", 1),
    ("+ class means (prototypes) instead of the nearest image", "alphabet-levers.json", "class_mean", 1),
    ("+ 5 views and class means", "alphabet-levers.json", "tta_5_views_class_mean", 5),
    ("+ k-reciprocal re-ranking against the enrolled images", "alphabet-levers.json", "k_reciprocal_rerank", 1),
    ("+ the average-pooling network's embedding concatenated (an ensemble of two trainings)", "alphabet-levers.json",
     "ensemble_2_models_1_views", 2),
    ("+ that ensemble, 5 views each", "alphabet-levers.json", "ensemble_2_models_5_views", 10),
]
# The presets on both splits: (preset, what differs, report file).
PRESET_RUNS = [
    ("fast-cpu", "", "alphabet-fast-cpu.json"), ("fast-cpu", "", "class-fast-cpu.json"),
    ("fewshot-cpu", "", "alphabet-fewshot-cpu.json"), ("fewshot-cpu", "", "class-fewshot-cpu.json"),
    ("fast-cpu", "with 20 epochs", "class-fast-cpu-20-epochs.json"),
    ("fast-cpu", "with average pooling and 20 epochs (before GeM)", "class-average-pooling.json"),
]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _shot(result: dict | None, shots: int) -> str:
    figure = (result or {}).get(f"{shots}shot")
    return f"{100 * figure['mean']:.1f} % ± {100 * figure['ci95']:.1f}" if figure else "-"


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "-"


def render_quality() -> str:
    """The learning-quality tables (options one at a time; the presets on both splits) from benchmarks/results/."""
    plain_ms = _load("alphabet-levers.json")["ms_per_query"]["1_views"]
    trained = _load("alphabet-fast-cpu.json")
    lines = ["| option (held out by alphabet) | 20-way 1-shot | 20-way 5-shot | training | predict time per query |",
             "|---|---|---|---|---|"]
    for title, name, lever, views in OPTIONS:
        report = _load(name)
        if lever is None:
            result, seconds, ms = report["trained"], report["train_seconds"], report["ms_per_query"]
        else:
            result, seconds = report[lever], trained["train_seconds"]
            if lever.startswith("ensemble"):
                seconds += _load("alphabet-average-pooling.json")["train_seconds"]
            ms = report["ms_per_query"].get(f"{views}_views", plain_ms * views) - plain_ms
        added = "-" if lever is not None and views == 1 else f"+{ms:.1f} ms" if lever is not None else f"{ms:.1f} ms"
        lines.append(f"| {title} | {_shot(result, 1)} | {_shot(result, 5)} | {_minutes(seconds)} | {added} |")
    levers = _load("alphabet-levers.json")
    tuning = levers["episode_fine_tuning"]
    lines += ["", f"The + rows use {levers['episodes']:,} episodes; on those, the `fast-cpu` network alone scores "
                  f"{_shot(levers['plain'], 1)} (1-shot) and {_shot(levers['plain'], 5)} (5-shot).",
              "", f"Episode-time fine-tuning of the last dense layer ({tuning['steps']} Adam steps on the enrolled "
                  f"images and {tuning['copies']} augmented copies of each, {tuning['1shot']['episodes']} episodes): "
                  f"1-shot {_shot(tuning, 1)}, against {_shot({'1shot': tuning['plain_on_the_same_episodes']}, 1)} without it on "
                  f"the same episodes; it costs {tuning['ms_per_enrolled_class']:.0f} ms per enrolled class.",
              "", "| preset | held out by | 20-way 1-shot | 20-way 5-shot | training | predict time per query |",
              "|---|---|---|---|---|---|"]
    for preset, variant, name in PRESET_RUNS:
        report = _load(name)
        split = f"{report['split']} ({report['heldout_classes']} classes)"
        title = f"`{preset}`" + (f" {variant}" if variant else "")
        lines.append(f"| {title} | {split} | **{_shot(report['trained'], 1)}** | {_shot(report['trained'], 5)} | "
                     f"{_minutes(report['train_seconds'])} | {report['ms_per_query']:.1f} ms |")
    return "\n".join([QUALITY_START, *lines, QUALITY_END])


def _replace_block(text: str, start: str, end: str, block: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no generated block (the markers {start!r} ... {end!r})")
    before, rest = text.split(start, 1)
    return before + block + rest.split(end, 1)[1]


def update(readme: Path, metrics_file: Path) -> bool:
    """Rewrite the generated blocks of ``readme``; returns whether it changed."""
    text = readme.read_text(encoding="utf-8")
    new = _replace_block(text, START, END, render(json.loads(metrics_file.read_text(encoding="utf-8"))), readme)
    new = _replace_block(new, QUALITY_START, QUALITY_END, render_quality(), readme)
    readme.write_text(new, encoding="utf-8")
    return new != text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics.json"))
    args = parser.parse_args()
    print(f"{args.readme}: {'updated' if update(args.readme, args.metrics) else 'already up to date'}")


if __name__ == "__main__":
    main()
