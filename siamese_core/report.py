"""Evaluation plots (PNG, drawn on matplotlib's Agg canvas, no pyplot state) and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import math
import os
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .data import decode_image
from .distance import squared_distances
from .evaluation import Assessment
from .evaluation_report import Baseline, Calibration, EvaluationReport, summary
from .gallery import Gallery
from .io import atomic_path

MAX_TICK_LABELS = 40  # class names shown per confusion-matrix axis; more are thinned
MAX_CELL_TEXT = 30  # counts are written in the cells up to this many classes


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def _quantity(series: str) -> str:
    """The kind of quantity a training-history series holds: one axis per kind."""
    if "loss" in series:
        return "triplet loss"
    if "dist" in series:
        return "squared distance"
    if series.startswith("fewshot") or "acc" in series:
        return "accuracy"
    return series


def loss_figure(history: dict[str, list[float]]) -> Figure:
    """Every series of the training history per epoch, one panel per kind of quantity (losses, distances,
    few-shot accuracy), so no axis mixes two kinds."""
    quantities = list(dict.fromkeys(_quantity(name) for name in history)) or ["triplet loss"]
    figure = Figure(figsize=(6, 1.2 + 2.2 * len(quantities)), layout="constrained")
    axes = figure.subplots(len(quantities), 1, sharex=True, squeeze=False)[:, 0]
    for ax, quantity in zip(axes, quantities):
        for name, values in history.items():
            if _quantity(name) == quantity:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    axes[0].set_title("Training")
    axes[-1].set_xlabel("epoch")
    return figure


def confusion_figure(labels: list[str], matrix) -> Figure:
    """The confusion matrix, rows normalised to recall, classes sorted by name.

    Counts are written in the cells up to ``MAX_CELL_TEXT`` classes; above
    ``MAX_TICK_LABELS`` classes only every n-th name is shown on the axes.
    """
    order = np.argsort(labels, kind="stable")
    names = [labels[i] for i in order]
    counts = np.asarray(matrix, dtype=float)[np.ix_(order, order)]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.25 * len(names), 20)
    figure = Figure(figsize=(side + 1, side))
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    step = math.ceil(len(names) / MAX_TICK_LABELS)
    ticks = np.arange(0, len(names), step)
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=8)
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix ({len(names)} classes)")
    if len(names) <= MAX_CELL_TEXT:
        for (row, col), n in np.ndenumerate(counts):
            if n:
                ax.text(col, row, str(int(n)), ha="center", va="center", fontsize=7,
                        color="white" if rates[row, col] > 0.5 else "black")
    return figure


def _sample_queries(correct: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` query indices, half of them wrong answers when there are that many."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(~correct), np.flatnonzero(correct)
    picked_wrong = rng.permutation(wrong)[: count // 2]
    picked_right = rng.permutation(right)[: count - len(picked_wrong)]
    return np.sort(np.concatenate([picked_wrong, picked_right])).astype(int)


def _frame(ax, colour: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _wrapped(label: str, width: int = 18) -> str:
    """A class name broken into lines that fit above one thumbnail (long names would run into the next):
    at spaces and after underscores (``Early_Aramaic__character01``), inside a word only when it is too long."""
    lines: list[str] = []
    for token in re.split(r"\s+|(?<=_)(?=[^_])", label.strip()):
        for piece in textwrap.wrap(token, width) or [token]:
            joiner = "" if lines and lines[-1].endswith("_") else " "
            if lines and len(lines[-1]) + len(joiner) + len(piece) <= width:
                lines[-1] += joiner + piece
            else:
                lines.append(piece)
    return "\n".join(lines) or label


def neighbours_figure(assessment: Assessment, gallery: Gallery, size: int, count: int = 8, seed: int = 0,
                      neighbours: int = 5) -> Figure:
    """Sample queries beside their nearest gallery images with squared distances.

    Half the sample are wrong answers when there are enough. A neighbour of the
    query's class is framed green, another class red; the query's title says
    whether its answer (the nearest class) was right.
    """
    rows = _sample_queries(assessment.correct, count, seed)
    k = min(neighbours, len(gallery))
    distances = squared_distances(assessment.queries[rows], gallery.embeddings)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    figure = Figure(figsize=(1.6 * (k + 1), 2.3 * max(len(rows), 1)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(max(len(rows), 1), k + 1, squeeze=False))
    test_labels = assessment.test.label_names
    for line, query in enumerate(rows):
        truth, match = test_labels[query], assessment.matches[query]
        ok = match.label == truth
        ax = axes[line, 0]
        ax.imshow(decode_image(assessment.test.paths[query], size))
        ax.set_title(f"{_wrapped(truth)}\n{'right' if ok else 'wrong: ' + _wrapped(match.label)}", fontsize=7,
                     color="green" if ok else "red")
        _frame(ax, "black")
        for col, index in enumerate(nearest[line], start=1):
            label = gallery.class_names[gallery.labels[index]]
            ax = axes[line, col]
            ax.imshow(decode_image(gallery.paths[index], size))
            ax.set_title(f"{_wrapped(label)}\n{distances[line, index]:.3f}", fontsize=7)
            _frame(ax, "green" if label == truth else "red")
    figure.suptitle("Queries (left) and their nearest gallery images, squared distance", fontsize=10)
    return figure


def projection_figure(gallery: Gallery) -> Figure:
    """The gallery embeddings projected on their first two principal components, coloured by class.

    PCA, not t-SNE: it takes milliseconds where t-SNE of a thousand points takes most of a minute on two cores.
    """
    centred = gallery.embeddings - gallery.embeddings.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    points = centred @ axes[:2].T if len(axes) >= 2 else np.c_[centred[:, :1], np.zeros(len(centred))]
    explained = singular[:2] ** 2 / max(float(np.sum(singular**2)), 1e-12)
    classes = len(gallery.class_names)
    figure = Figure(figsize=(7, 6))
    ax = figure.subplots()
    cmap = "tab10" if classes <= 10 else "tab20" if classes <= 20 else "turbo"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=gallery.labels, cmap=cmap, s=8, alpha=0.8,
                         vmin=-0.5, vmax=classes - 0.5)
    if classes <= 20:
        handles = scatter.legend_elements(num=list(range(classes)))[0]
        ax.legend(handles, gallery.class_names, fontsize=7, loc="best", markerscale=0.8)
    ax.set(xlabel=f"PC 1 ({explained[0]:.0%})", ylabel=f"PC 2 ({explained[-1]:.0%})",
           title=f"Gallery embeddings ({len(gallery)} images, {classes} classes)")
    return figure


def distance_figure(assessment: Assessment, gallery: Gallery, threshold: float | None, max_queries: int = 300,
                    seed: int = 0) -> Figure:
    """Histograms of squared distances, with the calibrated threshold.

    Left: query-gallery pairs of the same class (positive) and of different classes
    (negative), from up to ``max_queries`` queries. Right: each query's nearest
    distance, for right and wrong answers and for held-out (unknown) classes.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(assessment.queries))[:max_queries])
    pairs = squared_distances(assessment.queries[rows], gallery.embeddings)
    gallery_names = np.asarray(gallery.class_names)[gallery.labels]
    same = np.asarray(assessment.test.label_names)[rows][:, None] == gallery_names[None, :]
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    bins = np.linspace(0, float(np.percentile(pairs, 99.5)) or 1.0, 60)
    left.hist(pairs[same], bins=bins, density=True, alpha=0.6, label="positive pairs", color="tab:green")
    left.hist(pairs[~same], bins=bins, density=True, alpha=0.6, label="negative pairs", color="tab:red")
    left.set(title="Query-gallery pair distances", xlabel="squared distance", ylabel="density")
    nearest, correct = assessment.nearest_distances, assessment.correct
    series = [(nearest[correct], "right answers", "tab:green"), (nearest[~correct], "wrong answers", "tab:red")]
    if assessment.unknown_distances is not None:
        series.append((assessment.unknown_distances, "unknown classes", "tab:purple"))
    top = max(float(np.max(values)) for values, _, _ in series if len(values)) or 1.0
    for values, label, colour in series:
        if len(values):
            right.hist(values, bins=np.linspace(0, top, 40), alpha=0.6, label=label, color=colour)
    right.set(title="Nearest-match distance per query", xlabel="squared distance", ylabel="queries")
    for ax in (left, right):
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend(fontsize=8)
    return figure


def roc_figure(assessment: Assessment, calibration: Calibration) -> Figure:
    """Known against unknown queries on the calibrated score: the ROC curve (log scale of unknowns accepted,
    as a DET plot reads) with the operating point of the stored threshold."""
    from .openset import rates, roc_points

    known, unknown = assessment.known_scores, assessment.unknown_scores
    figure = Figure(figsize=(5.5, 4.5))
    ax = figure.subplots()
    if known is None or unknown is None or not len(known) or not len(unknown):
        ax.text(0.5, 0.5, "no unknown queries to draw", ha="center", va="center")
        return figure
    points = roc_points(known, unknown)
    floor = 0.5 / len(unknown)
    ax.plot(np.maximum(points["unknown_accepted"], floor), points["known_accepted"], color="tab:blue",
            label=f"{calibration.score} score")
    at = rates(known, np.ones(len(known), bool), unknown, calibration.threshold)
    ax.plot([max(1 - at["unknown_rejected"], floor)], [at["known_accepted"]], "o", color="black",
            label=f"threshold {calibration.threshold:.3g}")
    source = "held-out classes" if assessment.heldout is not None else "classes left out of the gallery"
    ax.set(xscale="log", xlabel="unknown queries accepted (log)", ylabel="known queries accepted", ylim=(0, 1.02),
           title=f"Known vs unknown ({source})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure


PLOT_FILES = {
    "Training loss": "loss.png",
    "Confusion matrix": "confusion.png",
    "Nearest neighbours of sample queries": "neighbours.png",
    "Gallery embeddings (PCA)": "embedding.png",
    "Distances and threshold": "distances.png",
    "Known vs unknown classes (ROC)": "unknown_roc.png",
}


def write_plots(assessment: Assessment, gallery: Gallery, history: dict, size: int, folder: str | os.PathLike
                ) -> dict[str, Path]:
    """Write the evaluation plots (``PLOT_FILES``) into ``folder``; returns ``{title: path}``."""
    folder = Path(folder)
    report = assessment.report
    calibration = report.calibration
    threshold = calibration.threshold if calibration and calibration.score == "nearest" else None  # a distance
    figures = {
        "Training loss": lambda: loss_figure(history),
        "Confusion matrix": lambda: confusion_figure(report.confusion_matrix.labels, report.confusion_matrix.matrix),
        "Nearest neighbours of sample queries": lambda: neighbours_figure(assessment, gallery, size),
        "Gallery embeddings (PCA)": lambda: projection_figure(gallery),
        "Distances and threshold": lambda: distance_figure(assessment, gallery, threshold),
        **({"Known vs unknown classes (ROC)": lambda: roc_figure(assessment, calibration)} if calibration else {}),
    }
    return {title: save_png(make(), folder / PLOT_FILES[title]) for title, make in figures.items()}


def report_images(folder: str | os.PathLike) -> dict[str, Path]:
    """The plots :func:`write_plots` wrote into ``folder``, as ``{title: path}``."""
    return {title: Path(folder) / name for title, name in PLOT_FILES.items() if (Path(folder) / name).is_file()}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(rows: dict[str, str]) -> str:
    """A two-column table of what a page is about (version, run, data version), left-aligned, no header row."""
    body = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows.items())
    return f"<table class=\"facts\"><tbody>{body}</tbody></table>"


def _figure(scores: EvaluationReport | Baseline, key: str) -> float | str:
    """A figure of :func:`summary`, with its 95 % interval where the report has one."""
    value = summary(scores)[key]
    interval = getattr(scores, f"{key}_ci95", None)
    return f"{value:.4f} [{interval.low:.4f}, {interval.high:.4f}]" if interval is not None else value


def _sections(report: EvaluationReport) -> list[str]:
    """The HTML of the metric tables of a report."""
    models: list[tuple[str, EvaluationReport | Baseline]] = [("trained model", report)] + [
        (name, baseline) for name, baseline in (("raw pixels", report.baseline_raw_pixels),
                                                ("untrained", report.baseline_untrained)) if baseline is not None
    ]
    keys = list(summary(report))
    parts = ["<h2>Test set against the gallery</h2>",
             _table(["metric", *[m for m, _ in models]], [[key, *[_figure(scores, key) for _, scores in models]]
                                                          for key in keys]),
             (f"<p>{report.n_queries} queries. Top-1 and MAP@R with their 95 % interval [low, high], a bootstrap "
              "over the queries. MAP@R: mean average "
              "precision at R, R = gallery images of the query's class (Musgrave et al., <i>A Metric Learning "
              "Reality Check</i>, 2020).</p>")]
    check = report.baseline_check
    parts.append(f"<p class='{'pass' if check.passed else 'flag'}'>{html.escape(check.sentence)}</p>")
    if check.comparisons and check.confidence:
        parts.append(_table(
            ["baseline", "metric", "trained model", "baseline", f"difference ({100 * check.confidence:g} % interval)",
             "verdict"],
            [[c.baseline.removeprefix("baseline_").replace("_", " "), c.metric, c.model, c.against,
              f"{c.difference_low:+.4f} to {c.difference_high:+.4f}", c.verdict] for c in check.comparisons]))
    if report.validation_warning:
        parts.append(f"<p class='flag'>{html.escape(report.validation_warning)}</p>")
    if report.calibration is not None:
        c = report.calibration
        parts += ["<h2>Unknown classes: threshold and operating points</h2>",
                  f"<p>Score <b>{html.escape(c.score)}</b>, threshold {c.threshold:.4g}, fitted to "
                  f"{html.escape(c.fit_to)}; target {'met' if c.target_met else 'missed'}, judged on "
                  f"{html.escape(c.target_judged_on)}. "
                  f"{html.escape(c.method)}. AUROC by score: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in c.auroc_by_score.items()) + ".</p>",
                  _table(["known accept target", "threshold", "known accepted", "unknown rejected",
                          "accuracy with rejection"],
                         [[p.known_accept_target, p.threshold, p.known_accepted, p.unknown_rejected,
                           p.accuracy_with_rejection] for p in c.operating_points])]
    if report.open_set is not None:
        parts += ["<h2>Known vs held-out classes (threshold fitted without them)</h2>",
                  _table(["", "value"], [[k, v] for k, v in report.open_set.to_dict().items()])]
    if report.fewshot:
        def accuracy(scores: EvaluationReport | Baseline, key: str) -> str:
            episode = (scores.fewshot or {}).get(key)
            return f"{episode.mean:.4f} ± {episode.ci95:.4f}" if episode else ""

        parts += ["<h2>Held-out classes enrolled without retraining</h2>",
                  _table(["episodes", *[m for m, _ in models]],
                         [[f"{r.n_way}-way {r.k_shot}-shot ({r.episodes} episodes)",
                           *[accuracy(scores, key) for _, scores in models]] for key, r in report.fewshot.items()]),
                  "<p>Accuracy ± its 95% interval. Each episode enrols k images of each held-out class "
                  "as the gallery and asks for the class of one other image of each.</p>"]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    recall, precision = report.per_class_recall, report.per_class_precision
    parts += ["<details><summary>Per-class precision and recall</summary>",
              _table(["class", "recall (accuracy)", "precision"], [[c, recall[c], precision[c]] for c in sorted(recall)]),
              "</details>"]
    return parts


def write_html(path: str | os.PathLike, report: EvaluationReport, images: dict[str, Path], title: str = "Evaluation report",
               header: dict[str, str] | None = None) -> Path:
    """One self-contained HTML page: the metric tables beside the baselines, and every plot embedded as base64.

    ``header`` rows (what was evaluated: model version, run, data version, params) open the page.
    """
    figures = [
        f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(Path(png).read_bytes()).decode('ascii')}\"><figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in images.items()
    ]
    page = "\n".join([
        "<!DOCTYPE html>",
        f"<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.facts td,.facts th{text-align:left}"
        ".facts th{font-weight:normal;color:#555}img{max-width:100%}figure{margin:1.5em 0}"
        ".flag{background:#fde2e1;border-left:5px solid #c0392b;padding:0.6em}"
        ".pass{background:#e3f4e1;border-left:5px solid #2e7d32;padding:0.6em}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
        _facts(header) if header else "",
        *_sections(report),
        "<h2>Plots</h2>",
        *figures,
        "</body></html>",
    ])
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
