"""The documentation site as a reader gets it: the params reference is the params model, the tuning table is its
benchmark's results, and lists render as lists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.doc_figures import (
    BATCH_END,
    BATCH_PAGE,
    BATCH_START,
    CONFIG_END,
    CONFIG_PAGE,
    CONFIG_START,
    RESULTS,
    TUNING_END,
    TUNING_PAGE,
    TUNING_START,
    generated_block,
    render_batch_predict,
    render_config_reference,
    render_tuning,
)

REPO = Path(__file__).resolve().parents[1]
# A line of a paragraph or list item that starts with a list marker: Markdown that did not become a list.
FLATTENED_LIST = re.compile(r"<(p|li)>((?:(?!</\1>).)*?\n\s*(?:[-*+]|\d+\.)\s(?:(?!</\1>).)*?)</\1>", re.S)


def test_the_params_reference_is_generated_from_the_params_model():
    from pipelines.params import PipelineParams

    block = generated_block(CONFIG_PAGE, CONFIG_START, CONFIG_END)
    assert block == render_config_reference(), "run python -m pipelines.doc_figures"
    for section in ("register", "serving", "monitoring"):
        for key in getattr(PipelineParams(), section).model_dump():
            assert f"| `{section}.{key}` |" in block or f"| `{section}.{key}." in block, f"{section}.{key}"
    assert "| `register.rollout` | `direct` | `direct` |" in block


def test_the_tuning_table_is_generated_from_its_results():
    block = generated_block(TUNING_PAGE, TUNING_START, TUNING_END)
    assert block == render_tuning(), "run python -m pipelines.doc_figures"
    report = json.loads((RESULTS / "tuning.json").read_text(encoding="utf-8"))
    for name, data in report["sets"].items():
        preset, final = data["presets"][data["best_preset"]], data["final"]["best_preset"]
        assert f"| {name} | tuned: trial {data['winner']['trial']}" in block
        assert f"| best preset: `{data['best_preset']}` | {100 * preset['objective']:.1f} ± " \
               f"{100 * preset['objective_ci95']:.1f} |" in block
        assert f"-way {100 * final['heldout_1shot']:.1f} ± {100 * final['heldout_1shot_ci95']:.1f} |" in block


def test_a_markdown_list_without_a_blank_line_before_it_is_caught():
    """The check itself: Python-Markdown's rendering of a list glued to its paragraph is found."""
    import markdown

    glued = markdown.markdown("What it adds:\n- it loads\n- it bounds")
    assert FLATTENED_LIST.search(glued)
    assert not FLATTENED_LIST.search(markdown.markdown("What it adds:\n\n- it loads\n- it bounds"))


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs not installed")
def test_no_page_of_the_built_site_renders_a_list_as_a_paragraph(tmp_path):
    subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--quiet", "-d", str(tmp_path / "site")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    found = [f"{page.relative_to(tmp_path / 'site')}: {match[2][:80]!r}"
             for page in sorted((tmp_path / "site").rglob("*.html"))
             for match in FLATTENED_LIST.finditer(page.read_text(encoding="utf-8"))]
    assert not found, "lists rendered as text (a blank line is missing before them):\n" + "\n".join(found)


def test_the_batch_prediction_table_is_generated_from_its_results():
    block = generated_block(BATCH_PAGE, BATCH_START, BATCH_END)
    assert block == render_batch_predict(), "run python -m pipelines.doc_figures"
    report = json.loads((RESULTS / "batch-predict.json").read_text(encoding="utf-8"))
    assert f"| {report['batch_over_loop']:.2f}x | - |" in block and "the same rows" in block
