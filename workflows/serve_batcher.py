"""Dynamic batching for one model: the next batch is formed when the model is free, from every request that
waited while the previous one ran.

Ray Serve's `@serve.batch` (2.60) forms a batch as soon as its wait ends and then queues it behind the running
one, so under load it decodes many small batches back to back (at 32 clients and 16 rows: 3 to 12 rows each,
0.09-0.13x the engine's throughput in `benchmarks/serve.py`). Forming the batch only once the model is free
fills it from the queue that built up meanwhile; the wait applies only to a request that found the model idle.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Waiting:
    item: Any
    size: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class ModelBatcher:
    """Runs `run_batch(items) -> results` (one result per item, in order), one batch at a time: awaited when it is
    a coroutine function (a call to another process), else in a worker thread.

    A batch holds at most `max_size` units (`size_of(item)`: an image request of n images counts n). Requests
    are taken in arrival order; one that does not fit waits at the head for the next batch. A batch closes when
    it is full or when its oldest request has waited `wait_s`. A cancelled request (its client went away) is
    dropped before it costs a row.
    """

    def __init__(self, run_batch: Callable[[list], Sequence], max_size: int, wait_s: float,
                 size_of: Callable[[Any], int] = lambda item: 1):
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.run_batch, self.max_size, self.wait_s, self.size_of = run_batch, max_size, wait_s, size_of
        self._queue: deque[_Waiting] = deque()
        self._arrival = asyncio.Event()
        self._consumer: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # units per batch run, for tests and logs

    async def submit(self, item: Any) -> Any:
        """The item's result, once the batch that holds it has run (its exception if the batch raised)."""
        size = self.size_of(item)
        if not 1 <= size <= self.max_size:
            raise ValueError(f"an item of size {size} does not fit a batch of {self.max_size}")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, size, future))
        self._arrival.set()
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.create_task(self._consume())
        return await future

    def _queued_size(self) -> int:
        total = 0
        for waiting in self._queue:
            if waiting.future.done():  # cancelled: it will take no row
                continue
            if total + waiting.size > self.max_size:
                break
            total += waiting.size
        return total

    async def _next_batch(self) -> list[_Waiting]:
        while True:
            while self._queue and self._queue[0].future.done():  # cancelled while waiting
                self._queue.popleft()
            if self._queue:
                break
            self._arrival.clear()
            await self._arrival.wait()
        deadline = self._queue[0].arrived + self.wait_s
        while self._queued_size() < self.max_size and (left := deadline - time.monotonic()) > 0:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, total = [], 0
        while self._queue and total + self._queue[0].size <= self.max_size:
            waiting = self._queue.popleft()
            if not waiting.future.done():
                batch.append(waiting)
                total += waiting.size
        return batch

    async def _consume(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(sum(waiting.size for waiting in batch))
            try:
                items = [waiting.item for waiting in batch]
                if inspect.iscoroutinefunction(self.run_batch):
                    results = await self.run_batch(items)
                else:
                    results = await asyncio.to_thread(self.run_batch, items)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as err:  # every caller of the batch gets the error; the batcher goes on
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(err)
                continue
            for waiting, result in zip(batch, results):
                if not waiting.future.done():
                    waiting.future.set_result(result)
