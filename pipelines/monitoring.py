"""What the served model was asked, over a window of the inference log, against its reference profile.

The figures: volume (records per hour over the records' own span) and latency; the unknown rate (answers
the clients got as ``unknown``) beside the over-threshold rate (answers over the calibrated threshold, which
rejection would have answered ``unknown``); the shift of the nearest-distance distribution (two-sample
Kolmogorov-Smirnov statistic, :func:`scipy.stats.ks_2samp`, and the Wasserstein distance); embedding drift
as the ROC AUC of a classifier trained to tell the window's embeddings from the reference sample (the
domain-classifier test, as Evidently's ``model`` method: 0.5 means the two cannot be told apart;
scikit-learn, cross-validated); and the predicted-class mix (Jensen-Shannon distance,
:func:`scipy.spatial.distance.jensenshannon`).

A rule of ``monitoring.rules`` fires when its figure passes its limit, its test says the difference from the
reference is significant (p under ``monitoring.rules.alpha``) and the window holds at least
``monitoring.min_records`` records. The tests: a one-sided binomial test of the unknown count against the
reference's unknown rate; the Kolmogorov-Smirnov test; a Mann-Whitney U test of the classifier's out-of-fold
scores (the AUC's own test); a chi-square test of the class counts against the reference's.

Only the answers clients got are judged: a shadow challenger's records (source ``shadow``) and a canary's
(alias ``challenger``) are counted apart, with their agreement, by :func:`roles`. One bad file of the log
(not Parquet, truncated, empty, of another schema) is named and skipped; the rest is judged. What a window
leaves out is said in its notes: a log that does not exist, records of other models only, records dated
after the window's end, versions the registry does not hold.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from siamese_core.reference import ReferenceProfile

from .inference_log import SCHEMA, UNKNOWN, filesystem
from .params import DriftRules, MonitoringConfig

EVENT = "siamese.monitoring.drift"
# The columns the figures read: a file without one of them is not of this log. Others, added to the log since,
# are null in older files.
REQUIRED = ("time", "request_id", "model_name", "model_version", "label", "distance", "decision", "latency_ms")
MOMENT = SCHEMA.field("time").type
READERS = 16  # files read at once: an object store answers each in milliseconds, so reads overlap
SHADOW, CANARY = "shadow", "canary"  # SHADOW is also the log's source of a shadow challenger's answers
RATE_FLOOR_HOURS = 1 / 60  # records_per_hour is taken over at least a minute


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


def roles(table: pa.Table, challenger_alias: str) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The records of ``table`` as ``(answers, shadow, canary)``: shadow answers (source ``shadow``) reached no
    client; a canary's are the challenger's answers (alias ``challenger_alias``); the rest are the answers
    clients got from the champion (or from a version served by number)."""
    shadow = pc.fill_null(pc.equal(table.column("source"), SHADOW), False)
    canary = pc.and_(pc.invert(shadow), pc.fill_null(pc.equal(table.column("model_alias"), challenger_alias), False))
    return table.filter(pc.invert(pc.or_(shadow, canary))), table.filter(shadow), table.filter(canary)


def served_version(answers: pa.Table, model_name: str, champion: str | None,
                   registered: Callable[[str], bool]) -> tuple[str | None, list[str]]:
    """Which version's answers to judge, and notes on the records left out: the registry's ``champion`` when it
    answered in the window, else the registered version that answered last. Versions the registry does not hold
    (``registered``) are skipped; other versions' answers (a champion before a promotion) are left out."""
    versions = answers.column("model_version").to_pylist()
    counts = Counter(versions)
    notes = [f"skipped {count} records of {model_name} version {version}: the registry has no such version"
             for version, count in counts.most_common() if not registered(version)]
    held = {version: count for version, count in counts.items() if registered(version)}
    if not held:
        return None, notes
    if champion in held:
        chosen = champion
    else:
        answered = sorted(zip(answers.column("time").to_pylist(), versions), key=lambda pair: pair[0])
        last = {version: moment for moment, version in answered}  # each version's latest answer
        chosen = max(held, key=lambda version: last[version])
        notes.append(f"the champion ({'no alias' if champion is None else f'version {champion}'}) gave no answers in "
                     f"the window: judging version {chosen}, which answered last")
    notes += [f"left out {count} answers of {model_name} version {version}: the judged version is {chosen}"
              for version, count in held.items() if version != chosen]
    return chosen, notes


def rollout_records(table: pa.Table, role: str) -> list[dict]:
    """Per version of the ``role`` (shadow or canary) records in ``table``: their count and the share that named
    the class the client got (``agreement``; None where the log does not say)."""
    versions = table.column("model_version").to_pylist()
    agrees = table.column("agrees").to_pylist()
    summary = []
    for version, count in Counter(versions).most_common():
        said = [agree for v, agree in zip(versions, agrees) if v == version and agree is not None]
        summary.append({"role": role, "version": version, "records": count,
                        "agreement": sum(said) / len(said) if said else None})
    return summary


def embedding_drift(reference: np.ndarray, current: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    """ROC AUC of a logistic regression telling ``current`` rows from ``reference`` rows, cross-validated
    (5 folds), and the one-sided Mann-Whitney U test's p-value of its out-of-fold scores (the AUC's own test);
    None when either side has fewer than 10 rows."""
    # scikit-learn and SciPy load slowly: only when a window is judged
    from scipy.stats import mannwhitneyu
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
    test = mannwhitneyu(scores[side == 1], scores[side == 0], alternative="greater")
    return float(roc_auc_score(side, scores)), float(test.pvalue)


def limits(rules: DriftRules) -> dict[str, float]:
    """Each rule's figure and its limit."""
    return {"unknown_rate": rules.unknown_rate_max, "distance_ks": rules.distance_shift_max,
            "embedding_drift_auc": rules.embedding_drift_max, "class_mix_js": rules.class_mix_max}


def fired_rules(figures: dict[str, float | None], settings: MonitoringConfig) -> tuple[list[str], list[str]]:
    """The rules that fire (figure over its limit, its p-value ``<figure>_pvalue`` under ``rules.alpha``, at least
    ``min_records`` records), each with its p-value, and notes on figures over their limit that do not fire."""
    records, alpha = int(figures.get("records") or 0), settings.rules.alpha
    fired: list[str] = []
    notes: list[str] = []
    if records < settings.min_records:
        return fired, [f"{records} records, under monitoring.min_records ({settings.min_records}): no rule fires"]
    for key, limit in limits(settings.rules).items():
        value, pvalue = figures.get(key), figures.get(f"{key}_pvalue")
        if value is None or value <= limit:
            continue
        if pvalue is None:
            notes.append(f"{key} {value:.3f} is over its limit {limit}, with no reference to test it against: "
                         "no rule fires")
        elif pvalue >= alpha:
            notes.append(f"{key} {value:.3f} is over its limit {limit} but not significant (p = {pvalue:.2g}, "
                         f"monitoring.rules.alpha {alpha}, {records} records): no rule fires")
        else:
            fired.append(f"{key} {value:.3f} > {limit} (p = {pvalue:.2g})")
    return fired, notes


@dataclass
class TrafficReport:
    """The figures of one window, the rules that fired and why, and the rollouts' records counted apart."""

    since: datetime
    until: datetime
    model_name: str
    model_version: str | None
    figures: dict[str, float | None] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predicted_mix: dict[str, int] = field(default_factory=dict)
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rollouts: list[dict] = field(default_factory=list)


def assess_traffic(table: pa.Table, reference: ReferenceProfile | None, settings: MonitoringConfig,
                   since: datetime, until: datetime, model_name: str, model_version: str | None) -> TrafficReport:
    """The figures of the window ``table`` (the answers one version gave clients) against ``reference``, and the
    rules that fire."""
    # SciPy loads slowly: only when a window is judged
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import binomtest, chi2_contingency, ks_2samp, wasserstein_distance

    report = TrafficReport(since, until, model_name, model_version)
    n = table.num_rows
    figures = report.figures
    figures["records"] = float(n)
    figures["requests"] = float(len(set(table.column("request_id").to_pylist()))) if n else 0.0
    if not n:
        report.notes.append("no records in the window")
        return report
    times = pc.min_max(table.column("time")).as_py()
    hours = (times["max"] - times["min"]).total_seconds() / 3600
    figures["span_hours"] = hours
    # over the records' own span, not the window's, and at least a minute: a burst reads as its minute's rate
    figures["records_per_hour"] = n / max(hours, RATE_FLOOR_HOURS)
    latency = np.asarray(table.column("latency_ms").to_numpy(zero_copy_only=False), dtype=float)
    figures["latency_p50_ms"], figures["latency_p95_ms"] = (float(v) for v in np.percentile(latency, [50, 95]))
    unknowns = table.column("decision").to_pylist().count(UNKNOWN)
    figures["unknown_rate"] = unknowns / n
    over = [flag for flag in table.column("over_threshold").to_pylist() if flag is not None]
    figures["over_threshold_rate"] = sum(over) / len(over) if over else None
    report.distances = np.asarray(table.column("distance").to_numpy(zero_copy_only=False), dtype=float)
    report.predicted_mix = dict(Counter(table.column("label").to_pylist()).most_common())
    if reference is None:
        report.notes.append("the model version has no reference profile (registered before monitoring existed): "
                            "only volume, latency and the unknown rates are reported")
    else:
        figures["reference_unknown_rate"] = reference.unknown_rate
        figures["unknown_rate_pvalue"] = float(binomtest(unknowns, n, reference.unknown_rate,
                                                         alternative="greater").pvalue)
        shift = ks_2samp(report.distances, reference.nearest_distances)
        figures["distance_ks"], figures["distance_ks_pvalue"] = float(shift.statistic), float(shift.pvalue)
        figures["distance_wasserstein"] = float(wasserstein_distance(report.distances, reference.nearest_distances))
        figures["distance_median"] = float(np.median(report.distances))
        figures["reference_distance_median"] = float(np.median(reference.nearest_distances))
        classes = sorted(set(reference.predicted) | set(report.predicted_mix))
        counts = np.array([[reference.predicted.get(c, 0) for c in classes],
                           [report.predicted_mix.get(c, 0) for c in classes]])
        figures["class_mix_js"] = float(jensenshannon(counts[0], counts[1], base=2))
        figures["class_mix_js_pvalue"] = float(chi2_contingency(counts).pvalue)
        embeddings = [e for e in table.column("embedding").to_pylist() if e is not None]
        drift = (embedding_drift(reference.embeddings.astype(np.float32), np.asarray(embeddings, dtype=np.float32))
                 if embeddings else None)
        if drift is not None:
            figures["embedding_drift_auc"], figures["embedding_drift_auc_pvalue"] = drift
        elif not embeddings:
            report.notes.append("no embeddings in the log (monitoring.log_embeddings: false): no embedding drift")
    report.fired, notes = fired_rules(figures, settings)
    report.notes += notes
    return report


def _distance_chart(report: TrafficReport, reference: ReferenceProfile | None) -> str:
    """The window's nearest distances against the reference's, as an inline PNG (base64)."""
    # matplotlib loads slowly: only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file-only backend

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


def number(value: float | None) -> str:
    """A figure as reports show it (``-`` for none)."""
    return "-" if value is None else f"{value:.4g}"


def report_html(report: TrafficReport, reference: ReferenceProfile | None, settings: MonitoringConfig) -> str:
    """A self-contained HTML page of the window: figures beside their limits, the rules that fired, the
    rollouts' records apart, the distance chart and the predicted-class mix."""
    bounds = limits(settings.rules)
    rows = "".join(f"<tr><td>{html.escape(key)}</td><td>{number(value)}</td><td>{bounds.get(key, '')}</td></tr>"
                   for key, value in report.figures.items())
    mix = "".join(f"<tr><td>{html.escape(label)}</td><td>{count}</td><td>{reference.predicted.get(label, 0) if reference else ''}"
                  f"</td></tr>" for label, count in list(report.predicted_mix.items())[:25])
    others = "".join(f"<tr><td>{other['role']}</td><td>{html.escape(str(other['version']))}</td>"
                     f"<td>{other['records']}</td><td>{number(other['agreement'])}</td></tr>" for other in report.rollouts)
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
<p>Window {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC: the answers clients got from this
version. A rule fires over its limit when its test gives p under {settings.rules.alpha} with at least
{settings.min_records} records.</p>{verdict}<ul>{notes}</ul>
<h2>Figures</h2><table><tr><th>figure</th><th>value</th><th>limit</th></tr>{rows}</table>
<h2>Rollouts, counted apart</h2><table><tr><th>role</th><th>version</th><th>records</th><th>agreement</th></tr>{others}</table>
<h2>Nearest distances</h2>{chart}
<h2>Predicted classes</h2><table><tr><th>class</th><th>this window</th><th>test split</th></tr>{mix}</table>
</body></html>"""
