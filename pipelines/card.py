"""The model card (a registered version's description, written from its run) and a pipeline run's summary."""

from __future__ import annotations

from pathlib import Path

from siamese_core.evaluation_report import EvaluationReport
from siamese_core.metrics import flatten
from siamese_core.openset import rejection_on

from .params import PipelineParams
from .tracking import tracking_uri, ui_links

_HEADLINE = ("top1", "top5", "class_avg_accuracy", "map_at_r", "fewshot.1shot.mean", "fewshot.5shot.mean")
_BASELINES = (("model", ""), ("raw pixels", "baseline_raw_pixels."), ("untrained network", "baseline_untrained."))


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def text_table(header: list[str], rows: list[list]) -> list[str]:
    """A table as an aligned, fenced text block: every Markdown renderer (MLflow's model page included)
    shows it in columns with space between them, which its bare Markdown tables do not. Numbers are
    right-aligned, ``None`` is ``-``."""
    cells = [header, *([_figure(value) for value in row] for row in rows)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(header))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) if number else cell.ljust(width)
                      for cell, width, number in zip(row, widths, numeric)).rstrip() for row in cells]
    return ["```text", *text, "```"]


def changed_params(params: PipelineParams) -> dict[str, tuple]:
    """Params that differ from the library's defaults: ``{key: (value, default)}`` (data and schedule left out)."""
    values = flatten(params.model_dump(mode="json"))
    defaults = flatten(PipelineParams().model_dump(mode="json"))
    return {key: (value, defaults.get(key)) for key, value in values.items()
            if value != defaults.get(key) and not key.startswith(("data.", "schedule."))}


def model_card(
    params: PipelineParams, metrics: dict, data: dict[str, dict], lineage: dict[str, str],
    version: str, decision: str, previous: float | None, reason: str = "", evaluation: EvaluationReport | None = None,
) -> str:
    """Markdown: decision, data version, metrics beside the baselines, changed params, threshold, use and limits.

    ``metrics`` are the flat figures of metrics.json; ``data`` maps a split to its folder, DVC
    digest and profile; ``lineage`` holds the run, commit and orchestration ids; ``reason`` is the gate's
    decision in words and ``evaluation`` the whole report (its ``baseline_check`` and ``calibration``).
    """
    metric = params.register.metric
    calibration = evaluation.calibration if evaluation else None
    rejecting = rejection_on(params.evaluate.reject_unknown, {"target_met": calibration.target_met} if calibration else {})
    lines = [
        f"# {params.register.model_name} version {version}",
        "",
        f"**Gate:** {decision} on `{metric}` = {_figure(metrics.get(metric))} "
        f"(champion before, on the same queries: {_figure(previous)}). {reason}",
        "",
        f"**Baselines:** {evaluation.baseline_check.sentence if evaluation else 'not checked.'}",
        "",
        "## Data",
        "",
        *text_table(["split", "folder", "DVC md5", "classes", "images"],
                    [[split, d["path"], d["md5"], d["classes"], d["images"]] for split, d in data.items()]),
        "",
        "## Metrics (test split, nearest gallery image; few-shot on held-out classes)",
        "",
    ]
    rows = [[key, *(metrics.get(f"{prefix}{key}") for _, prefix in _BASELINES)] for key in _HEADLINE]
    lines += text_table(["metric", *(name for name, _ in _BASELINES)],
                        [row for row in rows if any(value is not None for value in row[1:])])
    threshold = metrics.get("calibration.threshold")
    lines += ["", "## Unknown classes", ""]
    lines.append(
        f"Unknown score `{calibration.score if calibration else 'nearest'}` above {_figure(threshold)} answers `unknown`: cross-fitted on classes "
        f"left out of the gallery, {_figure(metrics.get('calibration.known_accepted'))} of known queries accepted and "
        f"{_figure(metrics.get('calibration.unknown_rejected'))} of unknown ones rejected (AUROC "
        f"{_figure(metrics.get('calibration.auroc'))}); rejection "
        f"{'is on' if rejecting else 'is off: the calibration missed its target or reject_unknown is false'}."
        if threshold is not None else "Not calibrated.")
    changed = changed_params(params)
    lines += ["", "## Params that differ from the defaults", "",
              *text_table(["key", "value", "default"],
                          [[key, str(value), str(default)] for key, (value, default) in sorted(changed.items())])]
    lines += [
        "", "## Intended use", "",
        f"Recognising images of the kind in `{params.data.train_dir}` by their nearest image in the gallery "
        "(the training images, plus any enrolled later). New classes are enrolled from a few images, without "
        "retraining; the few-shot rows above measure that on classes never trained on.",
        "", "## Limits", "",
        "- Figures come from one test split of the training classes and one set of held-out classes; "
        "other images (lighting, scale, style) may score lower.",
        "- An image of a class in no gallery still gets the nearest class unless rejection is on.",
        f"- Input is resized to {params.model.input_size} px; fine detail below that is lost.",
        "", "## Lineage", "",
        *[f"- {key}: `{value}`" for key, value in lineage.items()],
    ]
    return "\n".join(lines) + "\n"


SUMMARY_ROWS = (("top-1", "top1"), ("MAP@R", "map_at_r"), ("1-shot", "fewshot.1shot.mean"))


def run_summary(record: dict, metrics: dict, report: Path, experiment_id: str) -> str:
    """What a pipeline run produced, in a few lines: the version and its alias, the headline figures beside
    the baselines, where the report is and how to open the MLflow UI on the version."""
    _, version_link = ui_links(experiment_id, record)
    alias = {"champion": "it is the champion now"}.get(record["decision"], "the champion stays where it was")
    lines = [f"{record['model_name']} version {record['version']}: {record['decision']} ({alias})",
             f"{'':<8}{'model':>8}{'raw pixels':>12}{'untrained':>11}"]
    lines += [f"{label:<8}{metrics[key]:>8.4f}{metrics.get(f'baseline_raw_pixels.{key}', float('nan')):>12.4f}"
              f"{metrics.get(f'baseline_untrained.{key}', float('nan')):>11.4f}" for label, key in SUMMARY_ROWS
              if key in metrics]
    lines.append(f"report: {report}")
    opener = "" if tracking_uri().startswith("http") else "siamese ui (in a second terminal), then "
    lines.append(f"MLflow: {opener}{version_link}")
    return "\n".join(lines)
