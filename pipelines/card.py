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


def _with_interval(metrics: dict, key: str):
    """A figure of flat ``metrics`` with its 95 % interval ``[low, high]`` beside it where the metrics hold one."""
    value, low, high = metrics.get(key), metrics.get(f"{key}_ci95.low"), metrics.get(f"{key}_ci95.high")
    return value if low is None or high is None or value is None else f"{value:.4f} [{low:.2f}, {high:.2f}]"


def rejection_line(params: PipelineParams, evaluation: EvaluationReport | None) -> str:
    """One line: whether this version answers unknown images ``unknown``, and why not when it does not."""
    calibration = evaluation.calibration if evaluation else None
    if calibration is None:
        return ("unknowns: not rejected: no threshold was calibrated (it needs several gallery classes); "
                "every image gets its nearest class")
    if rejection_on(params.evaluate.reject_unknown, {"target_met": calibration.target_met}):
        return (f"unknowns: rejected above {calibration.threshold:.4g} ({calibration.known_accepted:.0%} of known "
                f"queries accepted, {calibration.unknown_rejected:.0%} of unknown ones rejected)")
    why = ("evaluate.reject_unknown is false" if params.evaluate.reject_unknown is False else
           f"the calibration missed its target: {calibration.unknown_rejected:.0%} of unknown queries rejected at "
           f"{calibration.known_accepted:.0%} of known ones accepted, against {calibration.unknown_reject_target:.0%}")
    return f"unknowns: not rejected ({why}); every image gets its nearest class"


def preset_hint(backbone: str, colour: float) -> str | None:
    """A line naming the preset likely to do better on this data (``colour``: the share of training images in
    colour), or None."""
    if colour >= 0.5 and backbone != "efficientnet_lite0":
        return ("hint: the training images are colour photos; preset photos-cpu (ImageNet-pretrained, offline) "
                "is likely to do better on them")
    if colour < 0.5 and backbone == "efficientnet_lite0":
        return "hint: the training images are greyscale; preset fast-cpu is likely to do as well, in less time"
    return None


def summary_notes(params: PipelineParams, evaluation: EvaluationReport, sample: dict, colour: float) -> list[str]:
    """The run summary's lines beyond its figures: the baseline verdict when it is not a clear win, the
    validation-loss warning, whether unknowns are rejected, the sample prediction marked right or wrong, and a
    preset likely to do better."""
    notes = []
    if evaluation.baseline_check.verdict not in (None, "beats"):
        notes.append(f"baselines: {evaluation.baseline_check.sentence}")
    if evaluation.validation_warning:
        notes.append(f"training: {evaluation.validation_warning}")
    notes.append(rejection_line(params, evaluation))
    verdict = "right" if sample["label"] == sample["true_label"] else "wrong"
    notes.append(f"sample: the champion answers {sample['image']} (class '{sample['true_label']}') with "
                 f"'{sample['label']}' at distance {sample['distance']:.4f}: {verdict}")
    hint = preset_hint(params.model.backbone, colour)
    return notes + ([hint] if hint else [])


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
        *([f"**Training:** {evaluation.validation_warning}", ""] if evaluation and evaluation.validation_warning
          else []),
        "## Data",
        "",
        *text_table(["split", "folder", "DVC md5", "classes", "images"],
                    [[split, d["path"], d["md5"], d["classes"], d["images"]] for split, d in data.items()]),
        "",
        "## Metrics (test split, nearest gallery image; few-shot on held-out classes)",
        "",
    ]
    rows = [[key, *(_with_interval(metrics, f"{prefix}{key}") for _, prefix in _BASELINES)] for key in _HEADLINE]
    lines += text_table(["metric", *(name for name, _ in _BASELINES)],
                        [row for row in rows if any(value is not None for value in row[1:])])
    comparisons = evaluation.baseline_check.comparisons if evaluation else None
    if comparisons:
        confidence = evaluation.baseline_check.confidence if evaluation else 0.0
        lines += ["", f"Model minus baseline on the same queries ({confidence:.0%} interval of the difference):", "",
                  *text_table(["metric", "baseline", "difference", "verdict"],
                              [[c.metric, c.baseline, f"[{c.difference_low:+.3f}, {c.difference_high:+.3f}]",
                                c.verdict] for c in comparisons])]
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


def report_header(params: PipelineParams, record: dict) -> dict[str, str]:
    """The HTML report's header: the version and its decision, the run, the data's DVC digests, the commit and
    the params changed from the defaults (``record`` is the register stage's registration.json)."""
    changed = ", ".join(f"{key}={value}" for key, (value, _) in sorted(changed_params(params).items()))
    return {
        "model version": f"{record['model_name']} version {record['version']} ({record['decision']})",
        "MLflow run": f"{record['run_name']} ({record['run_id']})",
        "data version (DVC md5)": ", ".join(f"{split} {digest}" for split, digest in record["data_versions"].items()),
        "git commit": record["git_commit"],
        "params changed from the defaults": changed or "none",
    }


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
    intervals = ["   ".join(f"{name} [{metrics[f'{prefix}{key}_ci95.low']:.2f}, {metrics[f'{prefix}{key}_ci95.high']:.2f}]"
                           for name, prefix in (("model", ""), ("raw", "baseline_raw_pixels."),
                                                ("untrained", "baseline_untrained."))
                           if f"{prefix}{key}_ci95.low" in metrics) for _, key in SUMMARY_ROWS[:2]]
    lines += [f"{'':<8}95 % intervals of {label}: {text}" for (label, _), text in zip(SUMMARY_ROWS, intervals) if text]
    lines += record.get("notes", [])
    lines.append(f"report: {report}")
    opener = "" if tracking_uri().startswith("http") else "siamese ui (in a second terminal), then "
    lines.append(f"MLflow: {opener}{version_link}")
    return "\n".join(lines)
