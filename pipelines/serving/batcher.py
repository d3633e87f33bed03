"""The micro-batcher: concurrent requests recognised in one forward pass, with a bounded queue and a deadline.

As BentoML's dispatcher does, it refuses work it cannot finish in time instead of queueing without end: a request is
taken on only while the images taken on and not yet answered stay within ``serving.queue_images``, and only when the
queue ahead, at the measured time per image, leaves it time before its deadline (``serving.deadline_ms`` from its
arrival); else :class:`Shed` at once, with the seconds after which to try again. A request whose deadline passes while
it waits is shed too. Decoding runs in a pool of its own (``serving.decode_threads``) and stops at the deadline, so a
request of heavy images holds one decoding thread for its own time at most, never the forward pass.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..params import ServingConfig
from ..pyfunc_model import Asked, DeadlinePassed

# Weight of the newest batch in the measured time per image.
SMOOTHING = 0.2


class Shed(Exception):
    """Work refused because it cannot be answered in time: 503, with ``retry_after`` seconds; ``reason`` names the
    limit (``queue``, ``deadline``) in /metrics."""

    def __init__(self, message: str, retry_after: int, reason: str):
        super().__init__(message)
        self.retry_after, self.reason = retry_after, reason


@dataclass(frozen=True)
class _Job:
    model: Any
    asked: Asked
    deadline: float
    answer: asyncio.Future


class Batcher:
    """One task gathers what is queued (up to ``max_batch_images``, waiting at most ``max_wait_ms`` for more) and hands
    it to one recognising thread, one call into the model per batch and version; while a batch runs the next one
    gathers. A bad image fails only its own request, a failing forward pass only its batch."""

    def __init__(self, settings: ServingConfig | None = None, batch_sizes=None):
        self.settings = settings or ServingConfig()
        self.batch_sizes = batch_sizes  # a Prometheus histogram of images per forward pass, or None
        self.pending = 0  # images taken on and not yet answered
        self.per_image_s = 0.0  # the forward pass's measured seconds per image
        self.counts = {"batches": 0, "requests": 0, "images": 0, "shed": 0}  # what /stats reports: accepted work
        self._queue: asyncio.Queue | None = None
        self._recognising = ThreadPoolExecutor(1, thread_name_prefix="recognise")
        self._decoding = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")

    def overloaded(self) -> str | None:
        """Why no more work is taken on now (None: it is)."""
        if self.pending >= self.settings.queue_images:
            return f"{self.pending} images taken on, the most serving.queue_images allows"
        wait = self.pending * self.per_image_s
        if wait >= self.settings.deadline_ms / 1000:
            return f"the images taken on take about {wait:.1f} s, past serving.deadline_ms"
        return None

    def retry_after(self) -> int:
        """Seconds until the work taken on now is answered, at least one."""
        return max(1, math.ceil(self.pending * self.per_image_s))

    def admit(self, images: int, arrived: float) -> None:
        """Take on a request of ``images`` that arrived at ``arrived`` (``time.monotonic()``), or raise Shed."""
        settings = self.settings
        if self.pending + images > settings.queue_images:
            self._shed(f"the server holds {self.pending} images and takes {settings.queue_images} at most "
                       "(serving.queue_images)", "queue")
        wait = (self.pending + images) * self.per_image_s
        left = arrived + settings.deadline_ms / 1000 - time.monotonic()
        if wait > left:
            self._shed(f"the images ahead take about {wait:.1f} s, past this request's deadline of "
                       f"{settings.deadline_ms:g} ms from its arrival (serving.deadline_ms)", "deadline")
        self.pending += images
        self.counts["requests"] += 1
        self.counts["images"] += images

    def _shed(self, message: str, reason: str) -> None:
        self.counts["shed"] += 1
        raise Shed(message, self.retry_after(), reason)

    async def answer(self, model, images: list, request_id: str | None, arrived: float,
                     client_labels: list[str] | None = None, recorded: bool = True) -> list:
        """The matches ``model`` (a :class:`pipelines.pyfunc_model.SiameseBundleModel`) gives a request's base64
        ``images``, logged by the model unless ``recorded`` is False; Shed when they cannot be answered in time."""
        self.admit(len(images), arrived)
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            loop.create_task(self._run(self._queue))
        deadline = arrived + self.settings.deadline_ms / 1000
        try:
            try:
                encoded, arrays = await loop.run_in_executor(self._decoding, model.decode, images, deadline)
            except DeadlinePassed:
                self.counts["shed"] += 1
                raise
            answer: asyncio.Future = loop.create_future()
            await self._queue.put(_Job(model, Asked(encoded, arrays, request_id, arrived, client_labels, recorded),
                                       deadline, answer))
            return await answer
        finally:
            self.pending -= len(images)

    async def _run(self, waiting: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await waiting.get()]
            images = len(batch[0].asked.arrays)
            gathered = loop.time() + self.settings.max_wait_ms / 1000
            while images < self.settings.max_batch_images:
                try:
                    job = waiting.get_nowait() if loop.time() >= gathered else await asyncio.wait_for(
                        waiting.get(), gathered - loop.time())
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(job)
                images += len(job.asked.arrays)
            now = time.monotonic()
            for job in batch:
                if job.deadline < now and not job.answer.done():
                    self.counts["shed"] += 1
                    job.answer.set_exception(Shed("this request's deadline passed while it waited (serving.deadline_ms)",
                                                  self.retry_after(), "deadline"))
            batch = [job for job in batch if not job.answer.done()]
            for model in {id(job.model): job.model for job in batch}.values():  # a swap may leave two versions
                group = [job for job in batch if job.model is model]
                await self._recognise(loop, model, group)

    async def _recognise(self, loop, model, group: list[_Job]) -> None:
        """One forward pass over ``group``; each job gets its answer."""
        images = sum(len(job.asked.arrays) for job in group)
        started = time.monotonic()
        answers = await loop.run_in_executor(self._recognising, model.answer, [job.asked for job in group])
        if images:
            took = (time.monotonic() - started) / images
            self.per_image_s = took if not self.per_image_s else (1 - SMOOTHING) * self.per_image_s + SMOOTHING * took
        self.counts["batches"] += 1
        if self.batch_sizes is not None:
            self.batch_sizes.observe(images)
        for job, answer in zip(group, answers):
            if job.answer.done():
                continue
            if isinstance(answer, Exception):
                job.answer.set_exception(answer)
            else:
                job.answer.set_result(answer)
