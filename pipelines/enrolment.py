"""Enrolment: the images of new classes added to a registered version's gallery by its unchanged network (no
retraining), registered as a new version; :func:`pipelines.registry.place_enrolled` gives it its alias."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import Param

from siamese_core.data import scan_folder
from siamese_core.metrics import flatten
from siamese_core.recognizer import SiameseRecognizer
from siamese_core.sharding import Sharder

from . import registry
from .gate import CHALLENGER, CHAMPION, ENROLLED
from .params import RegisterConfig
from .tracking import PipelineRun, client, ensure_experiment, tracked_run


def enroll_and_register(model_name: str, folder: str | os.PathLike, source: str = CHAMPION, promote: bool = False,
                        sharder: Sharder | None = None, register: RegisterConfig | None = None) -> dict:
    """Enrol class folders into a registered version's gallery, and register the result as a new version.

    ``source`` is an alias or a version number of ``model_name``. Its bundle is downloaded,
    the images of ``folder`` (``<class>/<image>``) are embedded by its unchanged network and
    added to its gallery, and the enlarged bundle is logged as a new run and model version,
    both tagged ``enrolled_from=<source version>``. The run goes to the source run's experiment.

    Aliases: without ``promote`` the new version takes ``enrolled`` and the champion stays where it is. With
    ``promote`` it goes the way to champion that ``register.rollout`` sets, without the champion gate (the source's
    test-set figure says nothing about the new classes, so the user decides): in direct mode it becomes ``champion``;
    in shadow or canary mode it becomes the ``challenger`` of a new rollout, and reaches champion on its live evidence.
    While a rollout is live, ``promote`` is refused (RegistryError) before anything is enrolled.
    """
    if promote:
        registry.refuse_during_rollout(model_name)
    base = registry.version_of(f"models:/{model_name}/{source}" if str(source).isdigit()
                               else f"models:/{model_name}@{source}")
    images = scan_folder(folder)
    tags = {"enrolled_from": str(base.version), "enrolled_folder": str(folder)}
    experiment_id = client().get_run(base.run_id).info.experiment_id if base.run_id else ensure_experiment("siamese")
    run_name = f"enrol-{Path(folder).name}-into-v{base.version}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    with (registry.bundle_copy(f"models:/{model_name}/{base.version}") as source_bundle,
          tempfile.TemporaryDirectory() as tmp):
        recognizer = SiameseRecognizer.load(source_bundle, sharder)
        known = set(recognizer.gallery.class_names)
        recognizer.enroll(images)
        new_classes = [name for name in recognizer.gallery.class_names if name not in known]
        with tracked_run(lambda: PipelineRun.create(experiment_id, run_name, tags)) as scope:
            scope.stage = "enrol"
            run = scope.run
            bundle = recognizer.save(Path(tmp) / "bundle", {"enrolled_from": f"{model_name}/{base.version}"})
            run.client.log_batch(run.run_id, params=[
                Param(key, str(value)) for key, value in flatten(recognizer.config.model_dump(mode="json")).items()])
            run.log_metrics({"gallery_size": len(recognizer.gallery), "classes": len(recognizer.gallery.class_names),
                             "enrolled_images": len(images), "new_classes": len(new_classes)})
            run.client.log_dict(run.run_id, {"folder": str(folder), "new_classes": new_classes,
                                             "images": dict(Counter(images.label_names))}, "enrolment.json")
            version = registry.register_bundle(run.run_id, model_name, bundle, tags)
            registry.describe_version(model_name, version, (
                f"Version {base.version} with {len(images)} images of `{folder}` enrolled into its gallery "
                f"(new classes: {', '.join(new_classes) or 'none'}). Same network, no retraining."))
    staged = registry.place_enrolled(model_name, version, promote, register,
                                     f"enrolled {folder} into version {base.version}")
    return {"run_id": run.run_id, "model_name": model_name, "version": version,
            "alias": CHALLENGER if staged else CHAMPION if promote else ENROLLED, "enrolled_from": str(base.version),
            "rollout": None if staged is None else staged.mode, "new_classes": new_classes,
            "gallery_size": len(recognizer.gallery)}
