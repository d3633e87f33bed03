"""Stage validate: check the train/test folders before anything is trained on them."""

from __future__ import annotations

import logging

from siamese_core.errors import DatasetError
from siamese_core.io import atomic_path

from ..files import write_json
from ..pipeline import VALIDATION, VALIDATION_TEXT, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Write the validation report; raise DatasetError, with the report logged to the run, on errors.

    Warnings are reported and the pipeline goes on.
    """
    report = ctx.params.data.validation()
    write_json(ctx.path(VALIDATION), report.to_dict())
    with atomic_path(ctx.path(VALIDATION_TEXT)) as tmp:
        tmp.write_text(report.text(max_paths=50) + "\n", encoding="utf-8")
    log.info("%s", report.text())
    if not report.ok:
        codes = ", ".join(sorted({f.code for f in report.errors}))
        for path in (VALIDATION, VALIDATION_TEXT):
            ctx.tracking.run.log_artifact(ctx.path(path))
        raise DatasetError(
            f"dataset validation failed with {len(report.errors)} errors ({codes}): "
            f"{report.errors[0].message}; full report in {ctx.path(VALIDATION_TEXT)}"
        )
    splits = report.summary["splits"]
    return {"train": splits["train"]["images"], "test": splits["test"]["images"],
            "classes": splits["train"]["classes"], "warnings": len(report.warnings)}
