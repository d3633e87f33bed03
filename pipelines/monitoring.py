"""What the served model was asked, over a window of the inference log, against its reference profile.

The figures: volume and latency; the unknown rate; the shift of the nearest-distance distribution
(two-sample Kolmogorov-Smirnov statistic, :func:`scipy.stats.ks_2samp`, and the Wasserstein
distance); embedding drift as the ROC AUC of a classifier trained to tell the window's embeddings
from the reference sample (the domain-classifier test, as Evidently's ``model`` method: 0.5 means
the two cannot be told apart; scikit-learn, cross-validated); and the predicted-class mix
(Jensen-Shannon distance, :func:`scipy.spatial.distance.jensenshannon`). A rule of
``monitoring.rules`` fires when its figure passes its limit and the window holds at least
``monitoring.min_records`` records.

One bad file of the log (not Parquet, truncated, empty, of another schema) is named and skipped; the
rest is judged. What a window leaves out is said in its notes: a log that does not exist, records of
other models only, records dated after the window's end.
"""

from __future__ import annotations

import html
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from siamese_core.reference import ReferenceProfile

from .inference_log import SCHEMA, filesystem
from .params import MonitoringConfig

EVENT = "siamese.monitoring.drift"
# The columns the figures read: a file without one of them is not of this log. Others, added to the log since,
# are null in older files.
REQUIRED = ("time", "request_id", "model_name", "model_version", "label", "distance", "decision", "latency_ms")
MOMENT = SCHEMA.field("time").type
READERS = 16  # files read at once: an object store answers each in milliseconds, so reads overlap


@dataclass
class Window:
    """The records of a window of the inference log, and notes on what it left out."""

    table: pa.Table
    notes: list[str] = field(default_factory=list)

    def of_model(self, model_name: str) -> pa.Table:
        """The records of ``model_name``; when there are none but records of other models, a note names those."""
        names = self.table.column("model_name")
        table = self.table.filter(pc.equal(names, model_name))
        if not table.num_rows and self.table.num_rows:
            seen = ", ".join(f"{name} ({count})" for name, count in Counter(names.to_pylist()).most_common(5))
            self.notes.append(f"no records of {model_name} (register.model_name) in the window; it holds records "
                              f"of {seen}")
        return table


def read_window(uri: str, since: datetime, until: datetime) -> Window:
    """The records of the inference log at ``uri`` whose time is in ``[since, until)``, with notes: a log that
    does not exist, each file that cannot be read (skipped), records dated at or after ``until``."""
    fs, root = filesystem(uri)
    fs.invalidate_cache()
    if not fs.exists(root):
        return Window(SCHEMA.empty_table(), [f"the inference log {uri} does not exist: nothing was logged there yet, "
                                             "or the servers log elsewhere (monitoring.log_uri, $SIAMESE_INFERENCE_LOG)"])
    first = f"date={since:%Y-%m-%d}"  # ISO dates sort as text; later folders are read for records in the future
    days = sorted(folder for folder in fs.glob(f"{root}/date=*") if folder.rsplit("/", 1)[-1] >= first)
    files = [file for day in days for file in fs.glob(f"{day}/*.parquet")
             if not file.rsplit("/", 1)[-1].startswith(".")]  # a file being written is hidden until renamed
    with ThreadPoolExecutor(READERS) as pool:
        read = list(pool.map(lambda file: _log_file(fs, file), files))
    tables, notes, future = [], [], 0
    for file, table in zip(files, read):
        if isinstance(table, str):
            notes.append(f"skipped {file}: {table}")
            continue
        times = table.column("time")
        future += pc.sum(pc.greater_equal(times, pa.scalar(until, MOMENT))).as_py() or 0
        tables.append(table.filter(pc.and_(pc.greater_equal(times, pa.scalar(since, MOMENT)),
                                           pc.less(times, pa.scalar(until, MOMENT)))))
    if future:
        notes.append(f"{future} records are dated at or after the window's end ({until:%Y-%m-%d %H:%M} UTC) and were "
                     "left out: is the clock of a machine that logs to it ahead?")
    return Window(pa.concat_tables(tables) if tables else SCHEMA.empty_table(), notes)


def _log_file(fs, path: str) -> pa.Table | str:
    """One file of the log in the log's schema (columns it lacks are null), or what makes it unreadable."""
    try:
        with fs.open(path, "rb") as file:
            table = pq.read_table(file)
        found = {column.name: column.type for column in table.schema}
        problems = [f"column {name} is {found[name]}, not {SCHEMA.field(name).type}" for name in SCHEMA.names
                    if name in found and not found[name].equals(SCHEMA.field(name).type)]
        missing = [name for name in REQUIRED if name not in found]
        if missing:
            problems.append(f"no column {', '.join(missing)}")
        if problems:
            return f"not a file of the inference log ({'; '.join(problems)})"
        return pa.table([table.column(name) if name in found else pa.nulls(table.num_rows, SCHEMA.field(name).type)
                         for name in SCHEMA.names], schema=SCHEMA)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        message = str(exc).strip().removeprefix("Could not open Parquet input source '<Buffer>': ")
        return (message.splitlines() or [type(exc).__name__])[0][:300]


def embedding_drift(reference: np.ndarray, current: np.ndarray, seed: int = 0) -> float | None:
    """ROC AUC of a logistic regression telling ``current`` rows from ``reference`` rows, cross-validated
    (5 folds); None when either side has fewer than 10 rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if len(reference) < 10 or len(current) < 10:
        return None
    rng = np.random.default_rng(seed)
    current = current[rng.permutation(len(current))[:max(len(reference), 10) * 4]]  # keep the classes near balance
    rows = np.concatenate([reference, current]).astype(np.float32)
    side = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(max_iter=1000), rows, side, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(side, scores))


@dataclass
class TrafficReport:
    """The figures of one window, the rules that fired and why."""

    since: datetime
    until: datetime
    model_name: str
    model_version: str | None
    figures: dict[str, float | None] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predicted_mix: dict[str, int] = field(default_factory=dict)
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0))


def assess_traffic(table: pa.Table, reference: ReferenceProfile | None, settings: MonitoringConfig,
                   since: datetime, until: datetime, model_name: str, model_version: str | None) -> TrafficReport:
    """The figures of the window ``table`` (records of one version of a model) against ``reference``, and the
    rules that fire."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp, wasserstein_distance

    report = TrafficReport(since, until, model_name, model_version)
    n = table.num_rows
    hours = max((until - since).total_seconds() / 3600, 1e-9)
    figures = report.figures
    figures["records"] = float(n)
    figures["requests"] = float(len(set(table.column("request_id").to_pylist()))) if n else 0.0
    figures["records_per_hour"] = n / hours
    if not n:
        report.notes.append("no records in the window")
        return report
    latency = np.asarray(table.column("latency_ms").to_numpy(zero_copy_only=False), dtype=float)
    figures["latency_p50_ms"], figures["latency_p95_ms"] = (float(v) for v in np.percentile(latency, [50, 95]))
    decisions = table.column("decision").to_pylist()
    figures["unknown_rate"] = decisions.count("unknown") / n
    report.distances = np.asarray(table.column("distance").to_numpy(zero_copy_only=False), dtype=float)
    report.predicted_mix = dict(Counter(table.column("label").to_pylist()).most_common())
    if reference is None:
        report.notes.append("the model version has no reference profile (registered before monitoring existed): "
                            "only volume, latency and the unknown rate are reported")
    else:
        figures["reference_unknown_rate"] = reference.unknown_rate
        shift = ks_2samp(report.distances, reference.nearest_distances)
        figures["distance_ks"], figures["distance_ks_pvalue"] = float(shift.statistic), float(shift.pvalue)
        figures["distance_wasserstein"] = float(wasserstein_distance(report.distances, reference.nearest_distances))
        figures["distance_median"] = float(np.median(report.distances))
        figures["reference_distance_median"] = float(np.median(reference.nearest_distances))
        classes = sorted(set(reference.predicted) | set(report.predicted_mix))
        figures["class_mix_js"] = float(jensenshannon([reference.predicted.get(c, 0) for c in classes],
                                                      [report.predicted_mix.get(c, 0) for c in classes], base=2))
        embeddings = [e for e in table.column("embedding").to_pylist() if e is not None]
        if embeddings:
            figures["embedding_drift_auc"] = embedding_drift(reference.embeddings.astype(np.float32),
                                                             np.asarray(embeddings, dtype=np.float32))
        else:
            report.notes.append("no embeddings in the log (monitoring.log_embeddings: false): no embedding drift")
    rules = settings.rules
    limits = {"unknown_rate": rules.unknown_rate_max, "distance_ks": rules.distance_shift_max,
              "embedding_drift_auc": rules.embedding_drift_max, "class_mix_js": rules.class_mix_max}
    if n < settings.min_records:
        report.notes.append(f"{n} records, under monitoring.min_records ({settings.min_records}): no rule fires")
        return report
    report.fired = [f"{key} {figures[key]:.3f} > {limit}" for key, limit in limits.items()
                    if figures.get(key) is not None and figures[key] > limit]  # type: ignore[operator]
    return report


def _distance_chart(report: TrafficReport, reference: ReferenceProfile | None) -> str:
    """The window's nearest distances against the reference's, as an inline PNG (base64)."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.2))
    both = report.distances if reference is None else np.r_[report.distances, reference.nearest_distances]
    bins = np.histogram_bin_edges(both, bins=30).tolist()  # one set of bins, so the two shapes compare
    if reference is not None:
        axis.hist(reference.nearest_distances, bins=bins, density=True, alpha=0.6, color="tab:green",
                  label="test split (reference)")
    axis.hist(report.distances, bins=bins, density=True, alpha=0.6, color="tab:purple", label="this window")
    axis.set_xlabel("squared distance to the nearest gallery image")
    axis.set_ylabel("density")
    axis.set_title("Nearest distances: traffic against the reference")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def report_html(report: TrafficReport, reference: ReferenceProfile | None, settings: MonitoringConfig) -> str:
    """A self-contained HTML page of the window: figures beside their limits, the rules that fired, the
    distance chart and the predicted-class mix."""
    limits = {"unknown_rate": settings.rules.unknown_rate_max, "distance_ks": settings.rules.distance_shift_max,
              "embedding_drift_auc": settings.rules.embedding_drift_max, "class_mix_js": settings.rules.class_mix_max}
    rows = "".join(
        f"<tr><td>{html.escape(key)}</td><td>{'-' if value is None else f'{value:.4g}'}</td>"
        f"<td>{limits.get(key, '')}</td></tr>" for key, value in report.figures.items())
    mix = "".join(f"<tr><td>{html.escape(label)}</td><td>{count}</td><td>{reference.predicted.get(label, 0) if reference else ''}"
                  f"</td></tr>" for label, count in list(report.predicted_mix.items())[:25])
    verdict = (f"<p class='bad'>Drift: {html.escape('; '.join(report.fired))}</p>" if report.fired
               else "<p class='good'>No rule fired.</p>")
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    chart = (f"<img alt='nearest distances' src='data:image/png;base64,{_distance_chart(report, reference)}'>"
             if len(report.distances) else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitoring {html.escape(report.model_name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}} .bad{{color:#b00;font-weight:bold}}
.good{{color:#070;font-weight:bold}}</style></head><body>
<h1>Monitoring: {html.escape(report.model_name)} version {html.escape(str(report.model_version))}</h1>
<p>Window {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC.</p>{verdict}<ul>{notes}</ul>
<h2>Figures</h2><table><tr><th>figure</th><th>value</th><th>limit</th></tr>{rows}</table>
<h2>Nearest distances</h2>{chart}
<h2>Predicted classes</h2><table><tr><th>class</th><th>this window</th><th>test split</th></tr>{mix}</table>
</body></html>"""
