"""Gathers concurrent requests into batches, so that one forward pass serves many.

Requests wait in one bounded queue (``capacity``; full: ``QueueFull``, the service answers 503 with Retry-After).
A batch takes the oldest request's model and up to ``max_batch`` waiting requests of that model, as soon as there
are that many or the oldest has waited ``max_wait`` seconds. ``infer(jobs)`` runs it in the inference thread (one
thread: the forward uses every core already); ``finish(jobs, outcome)`` then runs in the writer thread (storing,
committing) while the next batch is computed; at most ``write_ahead`` batches wait for the writer, so memory stays
bounded. Each request's future gets its own result or exception.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the inspection queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    model: str
    payload: Any
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    future: asyncio.Future | None = None


class Batcher:
    def __init__(self, infer: Callable[[list[Job]], Any], finish: Callable[[list[Job], Any], list],
                 max_batch: int = 16, max_wait: float = 0.01, capacity: int = 64, write_ahead: int = 2,
                 on_batch: Callable[[int], None] | None = None, on_depth: Callable[[int], None] | None = None):
        self.infer, self.finish = infer, finish
        self.max_batch, self.max_wait, self.capacity = max_batch, max_wait, capacity
        self.on_batch, self.on_depth = on_batch, on_depth
        self.pending: collections.deque[Job] = collections.deque()
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="clad-infer")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="clad-write")
        self._write_ahead = write_ahead
        self._seconds_per_image = 0.05  # moving average, for Retry-After
        self._task: asyncio.Task | None = None
        self._finishing: set[asyncio.Task] = set()

    # -- the event loop's side --------------------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._write_ahead)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clad-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        for job in self.pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is stopping"))
        self.pending.clear()
        self.infer_pool.shutdown(wait=True)
        self.write_pool.shutdown(wait=True)

    def depth(self) -> int:
        return len(self.pending)

    def submit(self, model: str, payload: Any) -> asyncio.Future:
        """Queue one request; its future resolves to its row (or raises). QueueFull when the queue is full."""
        if len(self.pending) >= self.capacity:
            raise QueueFull(self.retry_after())
        job = Job(model, payload)
        job.future = asyncio.get_running_loop().create_future()
        self.pending.append(job)
        self._depth_changed()
        self._wake.set()
        return job.future

    def retry_after(self) -> int:
        """Seconds in which the queue has likely drained."""
        return max(1, math.ceil(len(self.pending) * self._seconds_per_image))

    def run_in_worker(self, fn: Callable, *args) -> asyncio.Future:
        """Run ``fn(*args)`` in the inference thread, between batches (anything that uses a detector)."""
        return asyncio.get_running_loop().run_in_executor(self.infer_pool, fn, *args)

    def _depth_changed(self) -> None:
        if self.on_depth is not None:
            self.on_depth(len(self.pending))

    def _take(self) -> list[Job]:
        model = self.pending[0].model
        batch, rest = [], collections.deque()
        while self.pending and len(batch) < self.max_batch:
            job = self.pending.popleft()
            (batch if job.model == model else rest).append(job)
        rest.extend(self.pending)
        self.pending = rest
        self._depth_changed()
        return batch

    def _ready(self) -> int:
        model = self.pending[0].model
        return sum(1 for j in self.pending if j.model == model)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self.pending[0].queued + self.max_wait
            while self.pending and self._ready() < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if not self.pending:
                continue
            await self._slots.acquire()  # the writer is at most write_ahead batches behind
            batch = [j for j in self._take() if not j.future.cancelled()]
            if not batch:
                self._slots.release()
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            t0 = time.perf_counter()
            for job in batch:
                job.started = t0
            try:
                outcome = await loop.run_in_executor(self.infer_pool, self.infer, batch)
            except Exception as e:  # noqa: BLE001 - each request of the batch gets the error
                self._slots.release()
                _fail(batch, e)
                continue
            per_image = (time.perf_counter() - t0) / len(batch)
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image
            task = loop.create_task(self._finish(batch, outcome))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _finish(self, batch: list[Job], outcome) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.write_pool, self.finish, batch, outcome)
        except Exception as e:  # noqa: BLE001
            _fail(batch, e)
        else:
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self._slots.release()


def _fail(batch: list[Job], error: BaseException) -> None:
    for job in batch:
        if not job.future.done():
            job.future.set_exception(error)
