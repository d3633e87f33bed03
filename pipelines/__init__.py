"""Orchestration around siamese_core: stages, Prefect flows, MLflow tracking and registry, CLI."""
