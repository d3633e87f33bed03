"""One window of the monitoring flow, from the log to the drift event.

Which answers are judged: those the registry's champion gave clients (:func:`pipelines.monitoring.roles`,
:func:`pipelines.monitoring.served_version`); a shadow challenger's and a canary's records are counted apart,
with their agreement. The figures are the next point of the version's monitoring run in MLflow, which
:func:`pipelines.tracking.tracked_run` opens and ends (a failed window reads FAILED), with the window's HTML
report as an artifact. When a rule fires, the drift event goes to Prefect, and the window says where it went:
the server and the automations that expect it, or that nothing received it.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow.compute as pc
from mlflow.exceptions import MlflowException
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.events import CompositeTrigger, EventTrigger, Resource, ResourceSpecification, emit_event
from prefect.settings import PREFECT_API_URL

from siamese_core.errors import ConfigError
from siamese_core.reference import REFERENCE_FILE, ReferenceProfile

from .errors import RegistryError
from .monitoring import (
    CANARY,
    EVENT,
    SHADOW,
    TrafficReport,
    assess_traffic,
    number,
    read_window,
    report_html,
    roles,
    rollout_records,
    served_version,
)
from .params import PipelineParams
from .registry import CHALLENGER, alias_version, bundle_copy, version_number
from .tracking import PipelineRun, client, ensure_experiment, tracked_run, ui_url

log = logging.getLogger(__name__)

SERVE_THE_FLOWS = ("the retraining deployment and its drift trigger need a Prefect server: start one (prefect server "
                   "start), set PREFECT_API_URL and run `siamese flows serve`")


def monitor(params: PipelineParams, window_hours: float | None = None,
            logger: logging.Logger | logging.LoggerAdapter = log) -> dict:
    """Judge the last ``window_hours`` (default ``monitoring.window_hours``) of the inference log against the
    judged version's reference profile, log the window to its monitoring run, and raise the drift event when a
    rule fires; what it leaves out and the drift go to ``logger`` (a flow's run logger). Returns the figures, the
    rules that fired, the rollouts' records, the notes, where the event went, the report's location and the
    run id."""
    settings, name = params.monitoring, params.register.model_name
    uri = settings.log_location()
    if uri is None:
        raise ConfigError("monitoring.log_uri is null: there is no inference log to monitor")
    until = datetime.now(UTC)
    since = until - timedelta(hours=window_hours or settings.window_hours)
    window = read_window(uri, since, until)
    answers, shadow, canary = roles(window.of_model(name), CHALLENGER)
    champion = alias_version(name)
    version, notes = served_version(answers, name, None if champion is None else str(champion.version),
                                    lambda candidate: registered(name, candidate))
    window.notes += notes
    for note in window.notes:
        logger.warning("monitoring %s: %s", name, note)
    stamp, page = f"{until:%Y-%m-%dT%H:%M:%SZ}", f"windows/monitoring-{until:%Y%m%dT%H%M%SZ}.html"
    experiment = ensure_experiment(f"{params.register.experiment}-monitoring")
    event = None
    with tracked_run(lambda: monitoring_run(experiment, name, version)) as scope:
        run = scope.run
        step = len(run.client.get_metric_history(run.run_id, "records"))
        reference = reference_of(name, version) if version else None
        judged = answers.filter(pc.equal(answers.column("model_version"), version)) if version else answers.slice(0, 0)
        report = assess_traffic(judged, reference, settings, since, until, name, version)
        report.rollouts = rollout_records(shadow, SHADOW) + rollout_records(canary, CANARY)
        report.notes.extend(window.notes)
        run.log_metrics({**{key: value for key, value in report.figures.items() if value is not None},
                         **rollout_metrics(report)}, step)
        with tempfile.TemporaryDirectory() as tmp:
            written = Path(tmp) / Path(page).name
            written.write_text(report_html(report, reference, settings), encoding="utf-8")
            run.log_artifact(written, str(Path(page).parent))
        if report.fired:
            logger.warning("drift on %s version %s: %s", name, version, "; ".join(report.fired))
            event = raise_drift(name, run.run_id, stamp, report)
            logger.warning("drift event: %s", event)
        run.set_tags({"last_window": stamp, "drift": str(bool(report.fired)).lower(), "fired": "; ".join(report.fired),
                      "drift_event": event or ""})
    location = artifact_location(run.info.artifact_uri, page)
    publish(report, step, run, location, event)
    return {"run_id": run.run_id, "window": stamp, "model_version": version, "figures": report.figures,
            "fired": report.fired, "rollouts": report.rollouts, "notes": report.notes, "event": event,
            "report": location, "report_uri": f"runs:/{run.run_id}/{page}"}


def rollout_metrics(report: TrafficReport) -> dict[str, float]:
    """The rollouts' records and agreement as metrics: ``<role>_v<version>_records`` and ``..._agreement``."""
    metrics = {}
    for other in report.rollouts:
        key = f"{other['role']}_v{other['version']}"
        metrics[f"{key}_records"] = float(other["records"])
        if other["agreement"] is not None:
            metrics[f"{key}_agreement"] = other["agreement"]
    return metrics


def monitoring_run(experiment_id: str, model_name: str, version: str | None) -> PipelineRun:
    """The MLflow run that holds a version's monitoring, one point per window (so the UI charts each figure over
    time): created on its first window, resumed for the next ones."""
    found = client().search_runs([experiment_id], f"tags.model_name = '{model_name}' and tags.model_version = "
                                 f"'{version}'", max_results=1)
    if found:
        return PipelineRun.resume(found[0].info.run_id)
    return PipelineRun.create(experiment_id, f"monitoring-{model_name}-v{version}",
                              {"model_name": model_name, "model_version": str(version)})


def registered(model_name: str, version: str | None) -> bool:
    """Whether the registry holds version ``version`` of ``model_name``."""
    try:
        client().get_model_version(model_name, version_number(str(version)))
    except RegistryError:  # not a version number: a local bundle's answers, say
        return False
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def reference_of(model_name: str, version: str) -> ReferenceProfile | None:
    """The reference profile registered with a version (None for a version registered without one)."""
    with bundle_copy(f"models:/{model_name}/{version}") as bundle:  # the download is removed once read
        profile = bundle / REFERENCE_FILE
        return ReferenceProfile.load(profile) if profile.is_file() else None


def drift_resource(model_name: str) -> dict[str, str]:
    """The Prefect resource a model's drift event is about."""
    return {"prefect.resource.id": f"siamese.model.{model_name}", "prefect.resource.name": model_name}


def raise_drift(model_name: str, run_id: str, window: str, report: TrafficReport) -> str:
    """Emit the drift event of a window whose rules fired; where it went, in one sentence."""
    emit_event(EVENT, resource=drift_resource(model_name),
               payload={"monitoring_run_id": run_id, "window": window, "model_version": report.model_version,
                        "rules": report.fired})
    url = PREFECT_API_URL.value()
    if not url:
        return delivery(None, [])
    try:
        with get_client(sync_client=True) as prefect:
            automations = prefect.read_automations()
    except Exception as exc:  # a server that went away or refuses: the window is judged all the same
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"sent to the Prefect server {url}, whose automations could not be read ({first})"
    return delivery(url, receivers(automations, model_name))


def receivers(automations: list, model_name: str) -> list:
    """The automations whose trigger expects the drift event of ``model_name``."""
    resource = Resource.model_validate(drift_resource(model_name))
    return [automation for automation in automations if _expects(automation.trigger, resource)]


def _expects(trigger, resource: Resource) -> bool:
    if isinstance(trigger, CompositeTrigger):
        return any(_expects(part, resource) for part in trigger.triggers)
    if not isinstance(trigger, EventTrigger):
        return False
    wanted = not trigger.expect or any(pattern == EVENT or (pattern.endswith("*") and EVENT.startswith(pattern[:-1]))
                                       for pattern in trigger.expect)  # Prefect's trailing wildcard
    return wanted and ResourceSpecification.model_validate(trigger.match).matches(resource)


def delivery(api_url: str | None, matched: list) -> str:
    """Where a drift event went, in one sentence: no server (PREFECT_API_URL unset: a temporary server that stopped
    with the flow), a server where no automation expects it, or the automations that do."""
    if api_url is None:
        return (f"nothing received it: PREFECT_API_URL is not set, so {EVENT} went to a temporary Prefect server "
                f"that stopped with this flow; {SERVE_THE_FLOWS}")
    if not matched:
        return (f"sent to the Prefect server {api_url}, where no automation expects {EVENT}: nothing starts a "
                "retraining (run `siamese flows serve` against that server)")
    names = ", ".join(f"'{automation.name}'" + ("" if automation.enabled else " (disabled: it will not act)")
                      for automation in matched)
    return f"sent to the Prefect server {api_url}; automations that expect it: {names}"


def artifact_location(artifact_uri: str, path: str) -> str:
    """Where a run's artifact ``path`` is: a file's path when the artifact store is local, else its URI."""
    uri = f"{artifact_uri.rstrip('/')}/{path}"
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return uri


def publish(report: TrafficReport, step: int, run: PipelineRun, location: str, event: str | None) -> None:
    """The window as the Prefect artifact ``siamese-monitoring``: the verdict, the notes, the figures."""
    figures = "\n".join(f"| {key} | {number(value)} |" for key, value in report.figures.items())
    run_link = f"{ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run.run_id}"
    others = [f"- {rollout_line(other)}" for other in report.rollouts]
    create_markdown_artifact(key="siamese-monitoring", description=f"Monitoring of {report.model_name}", markdown="\n".join([
        f"# {report.model_name} version {report.model_version}: {'drift' if report.fired else 'no drift'}",
        f"Window {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC (point {step} of MLflow run "
        f"[{run.run_id}]({run_link})); report: `{location}`.", "",
        *(f"- fired: {rule}" for rule in report.fired), *([f"- drift event: {event}"] if event else []), *others,
        *(f"- {note}" for note in report.notes), "",
        "| figure | value |", "|---|---|", figures]))


def rollout_line(other: dict) -> str:
    """A rollout's records in a window, as the CLI and the artifact show them."""
    return (f"{other['role']} version {other['version']}: {other['records']} records, agreement "
            f"{number(other['agreement'])} (counted apart, not judged)")
