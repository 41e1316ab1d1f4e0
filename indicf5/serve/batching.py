"""The inference queue: requests wait here as jobs (an utterance's rows and its sampling
settings); each inference worker (one per device) takes the oldest job together with queued jobs
it can share a batch with, and renders them as one engine batch.

    handler ─submit─> [bounded queue] ─take: oldest + compatible─> worker(device) ─render─> futures

Jobs share a batch when their sampling settings match and their lengths are similar (padding a
short row to a long one wastes the engine's time). A cancelled job (client gone, timed out)
leaves the queue at once and is never rendered.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from indicf5.config import SamplingConfig
from indicf5.serve.metrics import Metrics
from indicf5.synth import Row, Synthesizer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the inference queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # a job is itself: queue removal goes by identity
class Job:
    rows: list[Row]
    sampling: SamplingConfig
    future: Future = field(default_factory=Future)  # -> list[Rendered], one per row

    @property
    def frames(self) -> int:
        return max(r.frames for r in self.rows)

    def batch_key(self) -> tuple:
        s = self.sampling
        return (s.nfe, s.cfg_strength, s.sway_coef, s.schedule, s.max_frames)


class InferenceQueue:
    def __init__(self, metrics: Metrics, max_queue: int = 64, max_batch_rows: int = 8, max_wait_s: float = 0.01,
                 length_ratio: float = 1.5):
        self.metrics, self.max_queue, self.max_batch_rows = metrics, max_queue, max_batch_rows
        self.max_wait_s, self.length_ratio = max_wait_s, length_ratio
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self.workers = 1

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, rows: list[Row], sampling: SamplingConfig) -> Future:
        job = Job(rows, sampling)
        with self._cond:
            if len(self._jobs) >= self.max_queue:
                waits = math.ceil(len(self._jobs) / self.workers) * self._batch_seconds
                raise QueueFull(max(1, math.ceil(waits)))
            self._jobs.append(job)
            self._depth_changed()
            self._cond.notify_all()
        job.future.add_done_callback(lambda f: f.cancelled() and self._forget(job))
        return job.future

    def _forget(self, job: Job) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                self.metrics.cancelled.inc()
                self._depth_changed()

    def _depth_changed(self) -> None:
        self.metrics.queue_depth.set(len(self._jobs))

    def _compatible(self, first: Job, job: Job) -> bool:
        lo, hi = sorted((first.frames, job.frames))
        return job.batch_key() == first.batch_key() and hi <= self.length_ratio * lo

    def _batch(self, first: Job) -> list[Job]:
        batch, rows = [], 0
        for job in self._jobs:
            if self._compatible(first, job) and (not batch or rows + len(job.rows) <= self.max_batch_rows):
                batch.append(job)
                rows += len(job.rows)
        return batch

    def take(self) -> list[Job]:
        """Blocks for work: the oldest job and the queued jobs compatible with it, marked running.
        Waits up to max_wait_s for batch-mates. [] once the queue is closed."""
        with self._cond:
            while True:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return []
                deadline = time.monotonic() + self.max_wait_s
                while self._jobs and (remaining := deadline - time.monotonic()) > 0 \
                        and sum(len(j.rows) for j in self._batch(self._jobs[0])) < self.max_batch_rows:
                    self._cond.wait(remaining)
                if not self._jobs:
                    continue
                batch = self._batch(self._jobs[0])
                for job in batch:
                    self._jobs.remove(job)
                self._depth_changed()
                running = [job for job in batch if job.future.set_running_or_notify_cancel()]
                if running:
                    return running

    def observe_batch(self, seconds: float) -> None:
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds

    def close(self) -> None:
        with self._cond:
            self._closed = True
            jobs = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in jobs:
            job.future.cancel()


class InferenceWorker(threading.Thread):
    """Renders the queue's batches on one device's engine, until the queue closes."""

    def __init__(self, queue: InferenceQueue, synthesizer: Synthesizer):
        super().__init__(name=f"inference-{synthesizer.device}", daemon=True)
        self.queue, self.synthesizer = queue, synthesizer

    def run(self) -> None:
        while jobs := self.queue.take():
            self.render(jobs)

    def render(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        start = time.perf_counter()
        try:
            rendered = self.synthesizer.render(rows, jobs[0].sampling)
        except Exception as e:  # the batch fails, the worker goes on
            log.exception("inference failed for a batch of %d rows", len(rows))
            for job in jobs:
                job.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        self.queue.observe_batch(seconds)
        self.queue.metrics.batch_rows.observe(len(rows))
        self.queue.metrics.batch_seconds.observe(seconds)
        for job in jobs:
            job.future.set_result([rendered.pop(0) for _ in job.rows])
