"""Dynamic batching on asyncio, with Ray Serve ``@serve.batch`` semantics.

Requests put one item each on a bounded queue and await a future. One collector takes
the first waiting item, then more until ``max_batch_size`` are in hand or ``max_wait_ms``
has passed since the first one arrived, whichever comes first, and hands the batch to
``fn`` in a worker thread (the event loop stays free to accept and answer requests). While a
batch runs, new items wait in the queue, so under load the next batch fills at once.

Backpressure: a full queue refuses the item at once (:class:`QueueFull`; the app answers
503 with ``Retry-After``), so the backlog is bounded by ``queue_size``. An item whose
caller gave up (a per-request timeout cancels its future) is skipped, never computed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(RuntimeError):
    """The batching queue is full: answer 503 and let the client retry."""


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float


class Batcher:
    """``await batcher.submit(x)`` → ``fn([..., x, ...])[i]``; see the module doc.

    ``fn`` takes a list of items and returns one result per item (same order); it runs
    in one dedicated thread, so forward passes never overlap. ``on_batch(size, wait_s)``
    is called for each batch (metrics)."""

    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int = 16,
                 max_wait_ms: float = 10.0, queue_size: int = 64,
                 on_batch: Callable[[int, float], None] | None = None):
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000
        self.queue_size = int(queue_size)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carflow-infer")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="carflow-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("server shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, value: Any) -> Any:
        """Queue ``value`` and wait for its result. Raises :class:`QueueFull` at once
        when ``queue_size`` items already wait."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() has not run")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(value, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue_size} images already wait for the model") from None
        return await fut

    async def _gather(self) -> list[_Item]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:  # whatever is already queued joins without waiting
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.TimeoutError, TimeoutError):
                break
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [it for it in await self._gather() if not it.future.done()]  # skip callers who gave up
            if not batch:
                continue
            started = time.perf_counter()
            if self.on_batch is not None:
                self.on_batch(len(batch), started - batch[0].enqueued)
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [it.value for it in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch fn returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            for it, res in zip(batch, results):
                if not it.future.done():
                    it.future.set_result((res, started - it.enqueued))
