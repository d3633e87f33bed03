"""The measured figures of the README and the documentation, generated so that they never drift from what a run measured.

``python -m pipelines.doc_figures`` rewrites the blocks between markers: the demo table in README.md
from the metrics.json that ``dvc repro`` wrote, and the learning-quality and small-data tables in
``docs/`` from the JSON reports of ``benchmarks/omniglot.py``, ``benchmarks/enrolment_levers.py`` and
``benchmarks/small_data.py`` kept in ``benchmarks/results/``, and the serving tables from those of
``benchmarks/serving.py``, ``benchmarks/scale_out.py`` and ``benchmarks/ray_serve.py``, and the tuning table from
that of ``benchmarks/tuning.py``; and the params.yaml reference in ``docs/reference/config.md`` from the typed params
model. A test fails when a page and its sources disagree.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .params import PipelineParams

START, END = "<!-- demo figures: generated from metrics.json by python -m pipelines.doc_figures -->", \
    "<!-- end of demo figures -->"
QUALITY_START, QUALITY_END = ("<!-- learning quality: generated from benchmarks/results/ by python -m pipelines.doc_figures -->",
                              "<!-- end of learning quality -->")
SMALL_START, SMALL_END = ("<!-- small data: generated from benchmarks/results/small-data.json by python -m "
                          "pipelines.doc_figures -->", "<!-- end of small data -->")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README, QUALITY_PAGE, SMALL_DATA_PAGE = (ROOT / "README.md", ROOT / "docs" / "explanation" / "learning-quality.md",
                                         ROOT / "docs" / "tutorials" / "own-data.md")
PERFORMANCE_PAGE = ROOT / "docs" / "explanation" / "performance.md"
LOG_START, LOG_END = ("<!-- inference log: generated from benchmarks/results/inference-log.json by python -m "
                      "pipelines.doc_figures -->", "<!-- end of inference log -->")
SERVING_START, SERVING_END = ("<!-- serving: generated from benchmarks/results/serving*.json by python -m "
                              "pipelines.doc_figures -->", "<!-- end of serving -->")
SCALE_START, SCALE_END = ("<!-- scale-out: generated from benchmarks/results/scale-out.json and ray-serve.json by "
                          "python -m pipelines.doc_figures -->", "<!-- end of scale-out -->")
SCALING_PAGE, SERVING_PAGE = ROOT / "docs" / "how-to" / "scaling.md", ROOT / "docs" / "how-to" / "serving.md"
TUNING_PAGE = ROOT / "docs" / "how-to" / "tuning.md"
BATCH_START, BATCH_END = ("<!-- batch prediction: generated from benchmarks/results/batch-predict.json by python -m "
                          "pipelines.doc_figures -->", "<!-- end of batch prediction -->")
BATCH_PAGE = ROOT / "docs" / "how-to" / "gallery.md"
TUNING_START, TUNING_END = ("<!-- tuning: generated from benchmarks/results/tuning*.json by python -m "
                            "pipelines.doc_figures -->", "<!-- end of tuning -->")
CONFIG_PAGE = ROOT / "docs" / "reference" / "config.md"
CONFIG_START, CONFIG_END = ("<!-- params reference: generated from pipelines/params.py by python -m pipelines.doc_figures -->",
                            "<!-- end of params reference -->")
COLUMNS = ("", "baseline_raw_pixels.", "baseline_untrained.")
# How far the demo's headline figures may move on another CPU type (oneDNN picks other kernels, so the last
# digits of the weights differ and a few queries flip): on the same type `dvc repro` gives them bit for bit.
DEMO_TOLERANCE = {"top1": 0.03, "map_at_r": 0.03, "fewshot.1shot.mean": 0.03, "fewshot.5shot.mean": 0.03,
                  "open_set.auroc": 0.03}


def _percent(metrics: dict, key: str) -> str:
    mean, interval = metrics.get(f"{key}.mean", metrics.get(key)), metrics.get(f"{key}.ci95")
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} %" + (f" ± {100 * interval:.1f}" if interval is not None else "")


def render(metrics: dict) -> str:
    """The demo table and the unknown-class sentence, from the flat metrics of an evaluate stage; top-1 and MAP@R
    with their 95 % interval [low, high] where the metrics have one."""
    def top1(m: dict, key: str) -> str:
        low, high = m.get(f"{key}_ci95.low"), m.get(f"{key}_ci95.high")
        return _percent(m, key) + (f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None and high is not None else "")

    def map_at_r(m: dict, key: str) -> str:
        low, high = m.get(f"{key}_ci95.low"), m.get(f"{key}_ci95.high")
        return (f"{m[key]:.3f}" if key in m else "-") + (f" [{low:.3f}, {high:.3f}]" if low is not None and high
                                                         is not None else "")

    rows: list[tuple[str, str, typing.Callable[[dict, str], str]]] = [
        (f"known classes: top-1 on the test split ({metrics['n_queries']} queries)", "top1", top1),
        ("known classes: MAP@R", "map_at_r", map_at_r),
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
        lines += ["", f"Held-out letters as unknowns, judged by a threshold fitted without them (`evaluate.open_set`, "
                      f"known accepted 90 %): AUROC {metrics['open_set.auroc']:.3f}, "
                      f"{100 * metrics['open_set.known_accepted']:.1f} % of known queries accepted, "
                      f"{100 * metrics['open_set.unknown_rejected']:.1f} % of held-out images rejected, accuracy with "
                      f"rejection {metrics['open_set.accuracy_with_rejection']:.3f}."]
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
                  f"{_shot(levers['plain'], 1)} (1-shot) and {_shot(levers['plain'], 5)} (5-shot). That network, and those "
                  "of the rows above `fast-cpu` now, were trained before `train.batchnorm_images`; retrained with it, "
                  "the presets moved by at most 0.2 points (the preset rows below).",
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


BASELINES = ("model", "raw_pixels", "untrained")


def _interval(figures: dict, key: str) -> tuple[float, float] | None:
    """The 95 % interval of a figure where the benchmark measured one: top-1's Wilson interval over the test
    queries, a few-shot mean plus or minus its half-width over episodes."""
    if f"{key}_interval" in figures:
        low, high = figures[f"{key}_interval"]
        return low, high
    if f"{key}_ci95" in figures:
        return figures[key] - figures[f"{key}_ci95"], figures[key] + figures[f"{key}_ci95"]
    return None


def _cell(figures: dict, key: str) -> str:
    value = figures.get(key)
    if value is None:
        return "-"
    if f"{key}_interval" in figures:
        low, high = figures[f"{key}_interval"]
        return f"{100 * value:.1f} ({100 * low:.0f}-{100 * high:.0f})"
    if f"{key}_ci95" in figures:
        return f"{100 * value:.1f} ± {100 * figures[f'{key}_ci95']:.1f}"
    return f"{100 * value:.1f}"


def _trio(entry: dict, key: str) -> str:
    """A figure of the trained network / raw pixels / untrained network, with 95 % intervals where measured; the
    trained one bold when it beats both baselines: its interval clear above theirs, or (no intervals) its value."""
    values = [entry[name].get(key) for name in BASELINES]
    if values[0] is None:
        return "-"
    intervals = [bounds for name in BASELINES if (bounds := _interval(entry[name], key)) is not None]
    if len(intervals) == len(BASELINES):
        wins = all(intervals[0][0] > other[1] for other in intervals[1:])
    else:
        wins = all(v is None or values[0] > v for v in values[1:])
    cells = [_cell(entry[name], key) for name in BASELINES]
    return " / ".join([f"**{cells[0]}**" if wins else cells[0], *cells[1:]])


def render_small_data() -> str:
    """The small-data table: every data set and preset beside raw pixels and the untrained network."""
    results = _load("small-data.json")
    lines = ["| data set (known + held-out classes) | preset | top-1 | MAP@R | 1-shot | 5-shot | "
             "held-out classes: AUROC, rejected, known accepted | training |",
             "|---|---|---|---|---|---|---|---|"]
    skipped = []
    for name, data in results.items():
        if "skipped" in data:
            skipped.append(f"{name} ({data['description']})")
            continue
        title = f"{name}: {data['description']} ({data['classes']['train']} + {data['classes']['heldout']})"
        for preset, entry in data["presets"].items():
            o = entry["open_set"]
            unknowns = (f"{o['auroc']:.3f}, {100 * o['unknown_rejected']:.0f} %, {100 * o['known_accepted']:.0f} %"
                        if o else "-")
            queries = f" ({entry['queries']} queries)" if "queries" in entry else ""
            lines.append(f"| {title} | `{preset}`{queries} | {_trio(entry, 'top1')} | {_trio(entry, 'map_at_r')} | "
                         f"{_trio(entry, 'fewshot_1shot')} | {_trio(entry, 'fewshot_5shot')} | {unknowns} | "
                         f"{entry['train_seconds']:.0f} s |")
            title = ""
    if skipped:
        lines += ["", "Not measured: " + ", ".join(skipped) + ". The benchmark fetches them, and the machine that "
                      "wrote this table could not (the reason is in `benchmarks/results/small-data.json`)."]
    return "\n".join([SMALL_START, *lines, SMALL_END])


def render_inference_log() -> str:
    """The logging-overhead table from ``benchmarks/inference_log.py``'s report."""
    report = _load("inference-log.json")
    s = report["summary"]
    lines = ["| inference log | p50 latency | requests/s |", "|---|---|---|",
             f"| off | {s['p50_ms_off']:.1f} ms | {s['rps_off']:.1f} |",
             f"| on | {s['p50_ms_on']:.1f} ms | {s['rps_on']:.1f} |",
             f"| on / off | {s['p50_ratio_on_off']:.3f} | {s['rps_ratio_on_off']:.3f} |", "",
             f"`siamese serve` with the demo's model, {report['clients']} concurrent clients sending "
             f"{report['requests_per_client']} requests each of one 32 px drawing, logging off and on alternately "
             f"({len(report['rounds'])} rounds, medians of rounds; {report['machine']}). "
             f"`python benchmarks/inference_log.py`."]
    return "\n".join([LOG_START, *lines, LOG_END])


def _rate(row: dict) -> str:
    return f"{row['requests_per_s']:,.0f}" if row["requests_per_s"] >= 100 else f"{row['requests_per_s']:.1f}"


def _latency(row: dict) -> str:
    return f"{row['p50_ms']:.1f} / {row['p95_ms']:.1f} / {row['p99_ms']:.1f}"


def _serving_table(report: dict) -> list[str]:
    """The two servers side by side, one row per request size and number of clients."""
    ours, theirs = report["servers"]["siamese serve"], report["servers"]["mlflow models serve"]
    lines = ["| request | clients | `siamese serve` req/s | p50 / p95 / p99 ms | CPU ms/req | `mlflow models serve` "
             "req/s | p50 / p95 / p99 ms | CPU ms/req |", "|---|---|---|---|---|---|---|---|"]
    for mine, other in zip(ours, theirs):
        errors = "" if not (mine["errors"] or other["errors"]) else f" (errors {mine['errors']} / {other['errors']})"
        lines.append(f"| {mine['request']} | {mine['clients']} | {_rate(mine)}{errors} | {_latency(mine)} | "
                     f"{mine['cpu_ms_per_request']:.2f} | {_rate(other)} | {_latency(other)} | "
                     f"{other['cpu_ms_per_request']:.2f} |")
    best = max(row["images_per_s"] for row in ours)
    lines += ["", f"Limits measured in the same run: the network alone at batch 64, "
                  f"{report['network_batch64_images_per_s']:,.0f} images/s (`siamese serve` reaches "
                  f"{best / report['network_batch64_images_per_s']:.2f} of it, {best:,.0f} images/s); the library's "
                  f"`recognizer.predict` loop in process, {report['in_process_single_image_per_s']:,.0f} single-image "
                  f"requests/s. Memory: `siamese serve` {max(r['rss_mb'] for r in ours):,} MB, `mlflow models serve` "
                  f"{max(r['rss_mb'] for r in theirs):,} MB. {report['machine']}; clients on keep-alive connections "
                  "(`benchmarks/load.py`)."]
    return lines


def render_serving(with_seed: bool = False) -> str:
    """The serving benchmark: the demo's champion, and with ``with_seed`` the seed architecture."""
    lines = ["The demo's champion (`python benchmarks/serving.py --multi`):", "", *_serving_table(_load("serving.json"))]
    if with_seed:
        lines += ["", "The seed architecture, ResNet50 at 200 px with the 512-256-256 head "
                      "(`python benchmarks/serving.py --architecture seed`):", "",
                  *_serving_table(_load("serving-seed.json"))]
    return "\n".join([SERVING_START, *lines, SERVING_END])


def render_scale_out() -> str:
    """The scale-out comparison: replicas behind nginx, and Ray Serve when it was measured."""
    report = _load("scale-out.json")
    rows = [*report["rows"]]
    ray = _load("ray-serve.json") if (RESULTS / "ray-serve.json").is_file() else None
    if ray is not None:
        loads = {(row["request"], row["clients"]) for row in rows}
        rows += [{"setup": f"Ray Serve {ray['ray']}, {ray['replicas']} replica(s), `@serve.batch`", **row}
                 for row in ray["rows"] if (row["request"], row["clients"]) in loads]
    lines = ["| setup | request | clients | req/s | images/s | p50 / p95 / p99 ms | CPU ms/req | memory MB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['request']} | {r['clients']} | {_rate(r)} | {r['images_per_s']:,.0f} | "
              f"{_latency(r)} | {r['cpu_ms_per_request']:.2f} | {r['rss_mb']:,} |" for r in rows]
    lines += ["", f"The demo's champion; {report['machine']}. `python benchmarks/scale_out.py`"
                  + (", `python benchmarks/ray_serve.py` (in its own environment, `.venv-ray`)." if ray else ".")]
    return "\n".join([SCALE_START, *lines, SCALE_END])


def render_tuning() -> str:
    """The tuning benchmarks (``tuning*.json``): on each set, the tuned settings against the best compared preset, on
    the validation objective and, both trained on the whole training folder, on the test split and the held-out
    classes."""
    tables = [_tuning_table(path.name) for path in sorted(RESULTS.glob("tuning*.json"), key=lambda p: p.name != "tuning.json")]
    return "\n".join([TUNING_START, *"\n\n".join(tables).splitlines(), TUNING_END])


def _tuning_table(file: str) -> str:
    report = _load(file)
    lines = ["| data set | settings | validation objective | test top-1 | held-out classes, 1-shot | training | search |",
             "|---|---|---|---|---|---|---|"]
    for name, data in report["sets"].items():
        winner, preset, final = data["winner"], data["best_preset"], data["final"]
        tuned = f"tuned: trial {winner['trial']}" + (f" (the preset `{winner['preset']}`)" if winner["preset"] else "")
        rows = [(tuned, winner, final["tuned"], f"{data['trials']} trials, {_minutes(data['seconds'])}"),
                (f"best preset: `{preset}`", data["presets"][preset], final["best_preset"], "-")]
        for title, row, scores, search in rows:
            lines.append(f"| {name} | {title} | {_cell(row, 'objective')} | {_cell(scores, 'test_top1')} | "
                         f"{scores['heldout_way']}-way {_cell(scores, 'heldout_1shot')} | "
                         f"{_minutes(scores.get('train_seconds'))} | {search} |")
            name = ""
    kept = [f"{name}: {data['kept_preset']}." for name, data in report["sets"].items() if data.get("kept_preset")]
    earlier = [name for name, data in report["sets"].items() if data.get("study_schema", 1) < 2]
    if earlier:
        kept.append(f"{', '.join(earlier)}: measured before the Wilson intervals (study schema 1), so the objective's "
                    "± is the normal approximation's, narrower near 100 %; the same study under the Wilson intervals "
                    "keeps the preset too.")
    command = f"python -m benchmarks.tuning --minutes {report['minutes']:g}"
    if file != "tuning.json":
        presets = sorted({p for data in report["sets"].values() for p in data["presets"]})
        command += f" --sets {' '.join(report['sets'])} --presets {' '.join(presets)} --out benchmarks/results/{file}"
    lines += ["", "In %, with 95 % intervals: the objective's combines those of its two parts, the held-out 1-shot's is "
                  "over its episodes, test top-1's a bootstrap over the test queries. Training: each trained on the "
                  f"whole training folder. {report['minutes']:g} minutes of tuning per set on {report['cores']} cores "
                  f"({report['machine']}); the search time includes training the winner. `{command}`.",
              *(["", *kept] if kept else [])]
    return "\n".join(lines)


def render_batch_predict() -> str:
    """The batch benchmark: predict-batch here and on two Dask workers against the library's predict loop."""
    report = _load("batch-predict.json")
    loop = report["loop_images_per_s"]
    rows = [("the library's `recognizer.predict` loop", loop, "-"),
            ("`siamese predict-batch`, in one process", report["batch_images_per_s"], "-"),
            ("`siamese predict-batch`, two Dask workers", report["dask_2_workers_images_per_s"],
             "the same rows" if report["dask_rows_equal"] else "**other rows**")]
    lines = ["| run | images/s | against the loop | rows |", "|---|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / loop:.2f}x | {rows} |" for name, rate, rows in rows]
    lines += ["", f"{report['images']:,} demo images in batches of {report['batch']} and shards of "
                  f"{report['shard_size']}, all three timed in one run; {report['machine']}. "
                  "`python benchmarks/batch_predict.py` (after `dvc repro`)."]
    return "\n".join([BATCH_START, *lines, BATCH_END])


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any]]:
    """Every key of a params model, dotted, with its pydantic field; sections are walked, not listed."""
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append((f"{prefix}{name}", field))
    return keys


def _yaml_value(value: typing.Any) -> str:
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip() + "`"


def _choices(annotation: typing.Any) -> str:
    """"One of ..." for a Literal (optionally or None), else nothing."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    literal = next((arg for arg in [annotation, *options] if typing.get_origin(arg) is typing.Literal), None)
    return "" if literal is None else " One of " + ", ".join(_yaml_value(v) for v in typing.get_args(literal)) + "."


def render_config_reference(params_file: Path = ROOT / "params.yaml") -> str:
    """The params.yaml reference: every key of the typed params, its value in params.yaml, its default, its help."""
    shipped = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    lines = ["| key | params.yaml | default | meaning |", "|---|---|---|---|"]
    for key, field in _keys(PipelineParams):
        default = field.default_factory() if field.default is PydanticUndefined else field.default
        value: typing.Any = shipped
        for part in key.split("."):
            value = value.get(part, PydanticUndefined) if isinstance(value, dict) else PydanticUndefined
        given = "-" if value is PydanticUndefined else _yaml_value(value)
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ") + _choices(field.annotation)
        lines.append(f"| `{key}` | {given} | {_yaml_value(default)} | {meaning.strip()} |")
    return "\n".join([CONFIG_START, *lines, CONFIG_END])


def outside_tolerance(fresh: dict, committed: dict) -> list[str]:
    """The demo's headline figures of a fresh run that moved further from the committed ones than
    :data:`DEMO_TOLERANCE` allows, each as "key: committed -> fresh"."""
    return [f"{key}: {committed[key]:.4f} -> {fresh.get(key)}" for key, allowed in DEMO_TOLERANCE.items()
            if not isinstance(fresh.get(key), float) or abs(fresh[key] - committed[key]) > allowed]


def _replace_block(page: Path, start: str, end: str, block: str) -> bool:
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{page}: no generated block (the markers {start!r} ... {end!r})")
    before, rest = text.split(start, 1)
    new = before + block + rest.split(end, 1)[1]
    page.write_text(new, encoding="utf-8")
    return new != text


def generated_block(page: Path, start: str, end: str) -> str:
    """The block between ``start`` and ``end`` in ``page``, markers included."""
    text = page.read_text(encoding="utf-8")
    return text[text.index(start):text.index(end) + len(end)]


def update(metrics_file: Path) -> list[Path]:
    """Rewrite every generated block; returns the pages that changed."""
    blocks = [(README, START, END, render(json.loads(metrics_file.read_text(encoding="utf-8")))),
              (QUALITY_PAGE, QUALITY_START, QUALITY_END, render_quality()),
              (SMALL_DATA_PAGE, SMALL_START, SMALL_END, render_small_data()),
              (PERFORMANCE_PAGE, LOG_START, LOG_END, render_inference_log()),
              (README, SERVING_START, SERVING_END, render_serving()),
              (SERVING_PAGE, SERVING_START, SERVING_END, render_serving(with_seed=True)),
              (SCALING_PAGE, SCALE_START, SCALE_END, render_scale_out()),
              (TUNING_PAGE, TUNING_START, TUNING_END, render_tuning()),
              (BATCH_PAGE, BATCH_START, BATCH_END, render_batch_predict()),
              (CONFIG_PAGE, CONFIG_START, CONFIG_END, render_config_reference())]
    return [page for page, start, end, block in blocks if _replace_block(page, start, end, block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics.json"))
    changed = update(parser.parse_args().metrics)
    print(f"updated: {', '.join(str(page.relative_to(ROOT)) for page in changed)}" if changed else "already up to date")


if __name__ == "__main__":
    main()
