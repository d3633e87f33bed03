"""`siamese serve`: the recogniser over HTTP, speaking MLflow's scoring protocol, one module a job.

- ``protocol``: the request's JSON read and checked against the limits (body, rows, time, the request head), errors
  in one line;
- ``following``: the versions a server follows (hot reload of an alias, a live challenger, this replica's tally);
- ``batcher``: the micro-batcher with a bounded queue and a deadline per request, shedding what cannot finish in time;
- ``metrics``: ``GET /metrics`` for Prometheus;
- ``app``: the ASGI app and :func:`serve`, which drains on SIGTERM.

A served request's walk: the app reads and parses it (protocol), picks its version (following), the batcher takes it
on or sheds it, decodes it in its own pool and recognises it with others in one call into the model per batch, which
also logs it (request id passed along, off the event loop); the app encodes the answer.
"""

from .app import serve, set_threads
from .following import Served, TrialFailed

__all__ = ["Served", "TrialFailed", "serve", "set_threads"]
