"""The pipeline stages, one module each, each with ``run(ctx) -> dict``.

:mod:`pipelines.pipeline` says what each reads and writes; :mod:`pipelines.runner` runs them
for ``siamese stage <name>`` (under ``dvc repro``) and for the Prefect flows.
"""
