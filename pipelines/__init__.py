"""Orchestration around siamese_core: the pipeline, its two drivers, tracking, registry, serving, monitoring
and the stack.

Module map, one owner per idea:

- ``cli``: the ``siamese`` command line (Typer); every command runs through ``process.guarded``.
- ``process``: the entry points' set-up and their one error boundary (one line, an exit status).
- ``errors``: the pipeline's user errors (no champion, a registry refusal, a stack failure).
- ``params``: params.yaml, validated into typed sections; presets.
- ``pipeline``: the stage table (what each stage reads and writes), stage keys, dvc.yaml's text.
- ``imports``: what a module imports, followed through this project: stage code deps, served-model requirements.
- ``stages/``: one module per stage (validate, triplets, train, embed, evaluate, register), each ``run(ctx)``, one
  job per step (``benchmarks/walk.py`` measures the register stage's walk and a served request's).
- ``runner``: running a stage, for ``siamese stage`` under ``dvc repro`` and for the flows (with their cache).
- ``stagecache``: the flows' content-addressed cache of stage outputs.
- ``flows``: the Prefect flows: training, prediction with the champion, retraining (scheduled or on a drift
  event), monitoring (a thin flow over ``monitoring_run``); their deployments.
- ``tracking``: MLflow runs: what a run records, the data's identity (DVC digests, profiles, commit), and the one
  way a run ends (``end_run``): a pipeline's through ``pipeline_run``, a tuning study's, a trial's or an erasure's
  audit run through ``ending``.
- ``registry``: every read and write of the model registry: versions and their cards, aliases (under the gate's
  lock), the gate's and the rollouts' registry side, promotion, rollback, repair, the champion's sample answer; it
  calls the pure rules of ``gate`` and ``rollout``.
- ``gate``: the alias names and the champion gate's decision, a pure function of the figures (lineage, baselines).
- ``scoring``: the champion and a new version scored on the queries both serve, before the gate's lock.
- ``integrity``: what a version is: its files' sha256, its code's identity (checked by ``siamese serve``), its download.
- ``enrolment``: new classes into a version's gallery without retraining, registered as a new version.
- ``card``: a version's model card.
- ``gallery_ops``: a gallery listed and corrected (classes or entries removed, a class renamed) on a bundle folder or as
  a new registered version, with the gate's checks for a gallery edit (pure).
- ``erasure``: a class or images erased from every place the pipeline keeps them, with an audit record.
- ``batch_predict``: a folder or ``s3://`` prefix recognised into one Parquet table, in resumable shards (here or on
  Dask).
- ``pyfunc_model``, ``served_model``: the registered MLflow model (models-from-code) and its request limits.
- ``serving/``: ``siamese serve``, the recogniser over HTTP with MLflow's scoring protocol, one module a job:
  ``protocol`` (requests read and bounded: body, rows, head size and time; errors in one line), ``following`` (the
  versions a server follows: hot reload, the live challenger, this replica's tally), ``batcher`` (micro-batches, a
  bounded queue and a deadline per request: what cannot finish in time is shed), ``metrics`` (``/metrics``), ``app``
  (the routes, ``serve()``, the drain on SIGTERM).
- ``rollout``: the rules of shadow and canary rollouts (pure): plans, replicas' signed tallies and their pooling,
  the automatic rollback rule and the evidence ``siamese promote`` asks for.
- ``inference_log``: one record per answer, written in the background to date-partitioned Parquet; the review queue.
- ``monitoring``: a window of the inference log against the version's reference profile: whose answers are judged,
  the figures, the drift rules (an effect over its limit, significant, on enough records), the report page.
- ``monitoring_run``: one window of the monitoring flow: the served champion's records, the version's MLflow run
  (through the one lifecycle), the report's location, the drift event and where it went.
- ``feedback``: labelled review images into the training data, with a manifest.
- ``files``: atomic JSON/CSV writers, DVC's content hash, linked copies, tree digests.
- ``demo_data``: the embedded Omniglot slice, written out as class folders.
- ``tuning``: ``siamese tune`` and the tuning flow: an Optuna study over the search space on a split of the
  training folder, each trial a nested MLflow run, resumable, trials in rounds (serial or on Dask).
- ``doc_figures``: the measured figures of the README and docs/, generated from metrics.json and benchmark results.
- ``stack``: ``siamese stack up | status | env | down``; ``supervisor`` (process groups, health checks,
  ports), ``stack_services`` (each service's recipe), ``stack_state`` (stack.json, secrets, environments),
  ``s3server`` (the signed, journalled S3 server).
"""
