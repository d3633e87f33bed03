"""Embedding large sets of image files in shards, on a Dask cluster or in this process.

A :class:`Sharder` is passed explicitly to :func:`~siamese_core.embed.embed_images` (through a
recogniser, :func:`~siamese_core.recognizer.build_gallery`), with the file of the network: the
files are split into :class:`Shard` tasks of ``shard_size`` and handed to its ``mapper``. Each
shard is embedded where the mapper runs it: the worker loads the network from its file once,
reads only its shard's files, in bounded batches, and sends back embeddings. The results
come back in shard order, so rows, order and labels are those of the in-process path.
Workers must see the same paths (one machine, or a shared file system).

Mappers: :func:`dask_mapper` (a ``dask.distributed`` client at an address, with retries
on a worker lost mid-shard), or the flows' Prefect tasks on ``prefect-dask``'s task runner.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import ConfigError

# mapper(function, items) -> [function(item) for item in items], computed wherever the mapper runs them
Mapper = Callable[[Callable, list], list]
DEFAULT_SHARD_SIZE = 512
DEFAULT_CONNECT_TIMEOUT_S = 10.0
ADDRESS_VARIABLE = "SIAMESE_DASK_ADDRESS"



@dataclass(frozen=True)
class Shard:
    """One task of a sharded embedding job: embed ``paths`` with the network saved at ``model_file``."""

    model_file: str
    paths: list[str]
    batch_size: int
    views: int
    shift: float


@dataclass(frozen=True)
class Sharder:
    """Where large embedding jobs go: ``mapper`` runs shards of ``shard_size`` image files."""

    mapper: Mapper
    shard_size: int = DEFAULT_SHARD_SIZE


def dask_address(configured: str | None) -> str | None:
    """The Dask scheduler to use: ``$SIAMESE_DASK_ADDRESS`` over the configured one; ``None`` is in-process."""
    return os.environ.get(ADDRESS_VARIABLE) or configured or None


def check_scheduler(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """ConfigError naming the address unless a Dask scheduler there answers within ``timeout`` seconds
    (a closed port, a listener that never speaks Dask)."""
    import asyncio

    from distributed.comm import connect as open_comm
    from distributed.core import send_recv

    async def identity() -> None:  # the connect timeout covers the TCP connection, not a peer that never answers
        comm = await open_comm(address, timeout=timeout)
        try:
            await send_recv(comm, op="identity")
        finally:
            comm.abort()

    try:
        asyncio.run(asyncio.wait_for(identity(), timeout))
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"{address}: no Dask scheduler answered within {timeout:g} s ({type(exc).__name__}); "
                          f"check compute.dask_address or ${ADDRESS_VARIABLE}") from None


def connect(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S):
    """A ``dask.distributed`` client of the scheduler at ``address``, checked first (:func:`check_scheduler`)."""
    from distributed import Client

    check_scheduler(address, timeout)
    return Client(address, set_as_default=False, timeout=timeout)


@contextmanager
def dask_mapper(address: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> Iterator[Mapper]:
    """A mapper over the ``dask.distributed`` cluster at ``address``, for the block; a shard lost
    with its worker is run again on another (Dask reschedules it; two retries on errors). A scheduler
    that does not answer within ``connect_timeout`` seconds is a one-line ConfigError naming the address."""
    with connect(address, connect_timeout) as client:

        def run(function: Callable, items: list) -> list:
            return client.gather(client.map(function, items, retries=2, pure=False))

        yield run


@contextmanager
def on_dask(address: str | None, shard_size: int = DEFAULT_SHARD_SIZE,
            connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> Iterator[Sharder | None]:
    """A sharder over the Dask cluster at ``address`` for the block, or None (in this process) without one."""
    if address is None:
        yield None
        return
    with dask_mapper(address, connect_timeout) as mapper:
        yield Sharder(mapper, shard_size)


def shards(sources: Sequence, shard_size: int) -> list[list]:
    """``sources`` cut into consecutive shards of at most ``shard_size``."""
    return [list(sources[i : i + shard_size]) for i in range(0, len(sources), shard_size)]
