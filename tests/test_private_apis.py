"""Every private API of a dependency this project relies on, in one place, each pinned by a test.

A dependency upgrade that moves one of them fails here, by name, instead of somewhere downstream.

| where | private API | why there is no public one |
|---|---|---|
| siamese_core/model.py `_BuiltBeforeFit` | `keras.Model._maybe_symbolic_build(iterator, data_batch)` | Keras builds a model from its first batch averaged over replicas, which MultiWorkerMirroredStrategy cannot do; this hook is the only place to build the optimizer first |
| siamese_core/model.py `_frozen_cut` | `KerasTensor._keras_history.operation` | a functional model exposes no public "operation that produced this tensor" |
| siamese_core/seeding.py | `keras.src.random.seed_generator.python_random` | the module Keras draws default layer seeds from; no public hook makes that draw thread-local |
| pipelines/tracking.py `PipelineRun.system_metrics` | `mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` | MLflow's public switch (`log_system_metrics`) works only for a fluent run it also ends; the pipeline's run outlives each stage |
| pipelines/pyfunc_model.py `_OneLineError` | the scoring server assigns `MlflowException.message` | `mlflow models serve` rewrites a model's error message to embed the whole request; the setter keeps the first, one-line message |
"""

from __future__ import annotations

import inspect

import keras


def test_keras_builds_through_maybe_symbolic_build():
    hook = keras.Model._maybe_symbolic_build
    assert list(inspect.signature(hook).parameters) == ["self", "iterator", "data_batch"]
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    assert "self._maybe_symbolic_build(" in inspect.getsource(TensorFlowTrainer.fit)  # fit builds through it


def test_a_keras_tensor_names_the_operation_that_made_it():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(2)
    outputs = dense(inputs)
    assert outputs._keras_history.operation is dense


def test_keras_draws_default_seeds_from_seed_generator_python_random():
    from keras.src.random import seed_generator

    assert hasattr(seed_generator, "python_random")
    assert "python_random" in inspect.getsource(seed_generator.make_default_seed)


def test_mlflow_system_metrics_monitor_takes_a_run_id():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    parameters = inspect.signature(SystemMetricsMonitor).parameters
    assert {"run_id", "sampling_interval", "resume_logging", "tracking_uri"} <= set(parameters)
    assert callable(SystemMetricsMonitor.start) and callable(SystemMetricsMonitor.finish)


def test_mlflow_scoring_server_rewrites_the_message_of_a_models_error():
    import mlflow.pyfunc.scoring_server as scoring_server

    from pipelines.pyfunc_model import RequestError

    assert "e.message = " in inspect.getsource(scoring_server)
    error = RequestError("row 0: not an image")
    error.message = "Failed to predict data '...'. Error: row 0: not an image"  # what the server does
    assert error.message == "row 0: not an image"
