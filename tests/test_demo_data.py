"""The embedded demo dataset: written once, the same bytes everywhere, and the version data/demo.dvc records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.demo_data import write_demo_data
from pipelines.files import content_hash
from siamese_core.data import scan_folder
from siamese_core.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]


def test_demo_data_is_the_version_the_repository_tracks(tmp_path):
    counts = write_demo_data(tmp_path / "demo")
    assert counts == {"train": 560, "test": 240, "heldout": 400, "known_classes": 40, "heldout_classes": 20}
    train, test, heldout = (scan_folder(tmp_path / "demo" / part) for part in ("train", "test", "heldout"))
    assert train.class_names == test.class_names and len(train.class_names) == 40
    assert not set(heldout.class_names) & set(train.class_names), "held-out classes are never trained on"
    tracked = yaml.safe_load((REPO / "data/demo.dvc").read_text())["outs"][0]
    assert content_hash(tmp_path / "demo") == tracked["md5"], "a fresh clone writes exactly the tracked data"


def test_demo_data_is_written_once_and_never_over_existing_data(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    done = runner.invoke(app, ["demo-data", "--out", str(out), "--no-dvc-add"])
    assert done.exit_code == 0, done.output
    assert "wrote 560 train, 240 test and 400 held-out images" in done.output
    mine = out / "train" / "Korean__character01" / "mine.png"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"my own drawing")
    again = runner.invoke(app, ["demo-data", "--out", str(out), "--no-dvc-add"])
    assert again.exit_code == 0 and "already holds data; nothing written" in again.output
    assert mine.read_bytes() == b"my own drawing"
    with pytest.raises(DatasetError, match="refusing to write the demo dataset"):
        write_demo_data(out)


def test_the_readme_demo_figures_are_the_committed_metrics():
    """The README's demo table is generated from metrics.json: a typed figure that drifts fails here."""
    from pipelines.doc_figures import END, README, START, generated_block, render

    block = generated_block(README, START, END)
    metrics = json.loads((REPO / "metrics.json").read_text(encoding="utf-8"))
    assert block == render(metrics), "run: python -m pipelines.doc_figures"
    assert f"**{100 * metrics['top1']:.1f} % [" in block  # the figure, then its 95 % interval


def test_the_docs_learning_quality_tables_are_the_committed_benchmark_reports():
    """The learning-quality tables are generated from benchmarks/results/*.json: a typed figure that drifts fails here."""
    from pipelines.doc_figures import QUALITY_END, QUALITY_PAGE, QUALITY_START, RESULTS, generated_block, render_quality

    block = generated_block(QUALITY_PAGE, QUALITY_START, QUALITY_END)
    assert block == render_quality(), "run: python -m pipelines.doc_figures"
    from pipelines.params import preset_config
    from siamese_core.config import Config

    shipped = json.loads((RESULTS / "alphabet-fast-cpu.json").read_text(encoding="utf-8"))
    preset = json.loads(preset_config(Config(), "fast-cpu").model_dump_json())
    for name in ("alphabet-fast-cpu.json", "class-fast-cpu.json"):  # measured with the preset as it ships
        measured = json.loads((RESULTS / name).read_text(encoding="utf-8"))["config"]
        config = json.loads(Config.model_validate(measured).model_dump_json())  # keys added since: their defaults
        assert (config["model"], config["train"]) == (preset["model"], preset["train"]), f"re-measure {name}"
    assert f"**{100 * shipped['trained']['1shot']['mean']:.1f} % ± {100 * shipped['trained']['1shot']['ci95']:.1f}**" in block


def test_the_docs_small_data_table_is_the_committed_benchmark_report():
    """The small-data table is generated from benchmarks/results/small-data.json; the recommended preset beats
    both baselines on MAP@R and 1-shot on every data set measured."""
    from pipelines.doc_figures import (
        RESULTS,
        SMALL_DATA_PAGE,
        SMALL_END,
        SMALL_START,
        generated_block,
        render_small_data,
    )

    assert generated_block(SMALL_DATA_PAGE, SMALL_START, SMALL_END) == render_small_data()
    measured = {name: data for name, data in json.loads((RESULTS / "small-data.json").read_text()).items()
                if "presets" in data}
    assert len(measured) >= 3
    for name, data in measured.items():
        figures = data["presets"]["fast-cpu"]
        for key in ("map_at_r", "fewshot_1shot"):
            assert figures["model"][key] > max(figures["raw_pixels"][key], figures["untrained"][key]), (name, key)
        assert figures["model"]["top1"] >= max(figures["raw_pixels"]["top1"], figures["untrained"]["top1"]), name


def test_the_docs_inference_log_overhead_is_the_committed_benchmark_report():
    """The logging-overhead table is generated from benchmarks/results/inference-log.json."""
    from pipelines.doc_figures import LOG_END, LOG_START, PERFORMANCE_PAGE, generated_block, render_inference_log

    assert generated_block(PERFORMANCE_PAGE, LOG_START, LOG_END) == render_inference_log()


def test_the_serving_tables_are_the_committed_benchmark_reports():
    """The serving and scale-out tables of the README and docs/ are generated from benchmarks/results/."""
    from pipelines.doc_figures import (
        README,
        SCALE_END,
        SCALE_START,
        SCALING_PAGE,
        SERVING_END,
        SERVING_PAGE,
        SERVING_START,
        generated_block,
        render_scale_out,
        render_serving,
    )

    assert generated_block(README, SERVING_START, SERVING_END) == render_serving()
    assert generated_block(SERVING_PAGE, SERVING_START, SERVING_END) == render_serving(with_seed=True)
    assert generated_block(SCALING_PAGE, SCALE_START, SCALE_END) == render_scale_out()
