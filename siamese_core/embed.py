"""Decoding images in parallel and embedding them in batches, with bounded memory."""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from . import sharding
from .data import decode_image

ImageSource = str | os.PathLike | bytes | np.ndarray


def _decode(source: ImageSource, size: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        from PIL import Image

        array = source if source.ndim == 3 else np.repeat(source[..., None], 3, axis=-1)
        if array.shape[:2] != (size, size):
            array = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((size, size)))
        return array.astype(np.uint8)[..., :3]
    return decode_image(source, size)


def decoded_batches(
    sources: Sequence[ImageSource], size: int, batch_size: int, workers: int | None = None
) -> Iterator[np.ndarray]:
    """Yield ``(n, size, size, 3)`` uint8 batches; decoding runs ahead on a thread pool.

    At most two batches are decoded ahead of the consumer, so memory does not grow
    with the number of images.
    """
    if all(isinstance(s, np.ndarray) for s in sources):  # decoded already (the server's path): no threads to start
        for start in range(0, len(sources), batch_size):
            yield np.stack([_decode(s, size) for s in sources[start : start + batch_size]])
        return
    workers = workers or min(8, os.cpu_count() or 1)
    decode = partial(_decode, size=size)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        starts = iter(range(0, len(sources), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(decode, s) for s in sources[start : start + batch_size]])

        submit_next()
        submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield np.stack([f.result() for f in futures])


def decode_all(sources: Sequence[ImageSource], size: int, batch_size: int = 64) -> np.ndarray:
    """Decode every image into one ``(n, size, size, 3)`` uint8 array."""
    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)
    start = 0
    for batch in decoded_batches(sources, size, batch_size):
        out[start : start + len(batch)] = batch
        start += len(batch)
    return out


def _padded_size(n: int, batch_size: int) -> int:
    """The batch size ``n`` images are padded to: the next power of two, at most ``batch_size``.

    A handful of traced shapes, and a single image costs one forward pass, not ``batch_size``.
    """
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


# Test-time views: offsets in steps of the shift, identity first, then the 4 diagonal and the 4 axial neighbours.
VIEW_OFFSETS = ((0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1), (-1, 0), (1, 0), (0, -1), (0, 1))
VIEW_SHIFT = 0.05


def shifted_views(images: np.ndarray, views: int, shift: float = VIEW_SHIFT) -> list[np.ndarray]:
    """The images and ``views - 1`` copies moved by ``shift`` of the side (diagonally first; edges
    repeated): the inputs whose embeddings test-time augmentation averages."""
    side = images.shape[1]
    step = max(1, round(side * shift))
    padded = np.pad(images, ((0, 0), (step, step), (step, step), (0, 0)), mode="edge")
    return [padded[:, step + dy * step : step + dy * step + side, step + dx * step : step + dx * step + side]
            for dy, dx in VIEW_OFFSETS[:views]]


def _unit_length(model) -> bool:
    import keras

    return isinstance(model.layers[-1], keras.layers.UnitNormalization)


def _predict_batch(model, batch: np.ndarray, batch_size: int, views: int = 1, shift: float = VIEW_SHIFT) -> np.ndarray:
    """``model`` on one batch, padded to :func:`_padded_size` rows; with ``views`` > 1, the mean
    embedding of the :func:`shifted_views` (back to unit length when the model's are)."""
    n = len(batch)
    padded = _padded_size(n, batch_size)
    if n < padded:
        batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
    if views == 1:
        return np.asarray(model.predict_on_batch(batch.astype(np.float32)))[:n]
    mean = np.mean([model.predict_on_batch(view.astype(np.float32)) for view in shifted_views(batch, views, shift)],
                   axis=0)[:n]
    if _unit_length(model):
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return mean


def predict_array(model, rows: np.ndarray, batch_size: int = 64, views: int = 1, shift: float = VIEW_SHIFT) -> np.ndarray:
    """Run ``model`` over an in-memory array (images or features) in batches; float32 out.
    ``views`` > 1 averages that many :func:`shifted_views` of each image."""
    out = np.empty((len(rows), *model.output_shape[1:]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        out[start : start + batch_size] = _predict_batch(model, rows[start : start + batch_size], batch_size, views, shift)
    return out


def embed_images(model, sources: Sequence[ImageSource], batch_size: int = 64, progress: bool = False,
                 views: int = 1, shift: float = VIEW_SHIFT, sharder: sharding.Sharder | None = None,
                 model_file: str | os.PathLike | None = None) -> np.ndarray:
    """Embed images with ``model`` in batches; returns ``(n, dim)`` float32.

    ``views`` > 1 is test-time augmentation: each image's embedding is the mean over the image and
    ``views - 1`` copies shifted by ``shift`` of the side (:func:`shifted_views`), at ``views``
    times the cost. With a ``sharder`` and the file ``model`` was loaded from, more image files than
    one shard go out in :class:`~siamese_core.sharding.Shard` tasks to its mapper (a Dask cluster);
    the rows come back in order.
    """
    if (sharder is not None and model_file is not None and len(sources) > sharder.shard_size
            and all(isinstance(s, (str, os.PathLike)) for s in sources)):
        # absolute paths: a worker runs in a directory of its own
        tasks = [sharding.Shard(os.path.abspath(model_file), shard, batch_size, views, shift)
                 for shard in sharding.shards([os.path.abspath(str(s)) for s in sources], sharder.shard_size)]
        return np.concatenate(sharder.mapper(embed_shard, tasks)).astype(np.float32, copy=False)
    size = int(model.input_shape[1])
    out = np.empty((len(sources), int(model.output_shape[-1])), dtype=np.float32)
    batches = decoded_batches(sources, size, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(sources) // batch_size), desc="embedding", unit="batch")
    start = 0
    for batch in batches:
        out[start : start + len(batch)] = _predict_batch(model, batch, batch_size, views, shift)
        start += len(batch)
    return out


def embed_shard(shard: sharding.Shard) -> np.ndarray:
    """Where a mapper runs it (a Dask worker): embed one shard of image files with the network saved at
    ``shard.model_file`` (loaded once per process)."""
    stat = os.stat(shard.model_file)
    return embed_images(_network(shard.model_file, stat.st_size, stat.st_mtime_ns), shard.paths, shard.batch_size,
                        views=shard.views, shift=shard.shift)


@functools.lru_cache(maxsize=2)
def _network(model_file: str, size: int, mtime_ns: int):
    """The network saved at ``model_file`` (a changed file, by size or time, is a new key)."""
    from .model import load_embedding

    return load_embedding(model_file)
