"""The inference queue: requests wait here as jobs (rows of utterance chunks and their sampling
settings); each device's worker takes the oldest job together with queued jobs it can share a
batch with, samples them as one engine batch, and hands the mels to its vocoder thread.

    handler ─submit─> [bounded queue] ─take: oldest + compatible─> sampler(device) ─mels─> vocoder ─> futures
                                         (once the previous batch's        (its own CUDA stream: it runs
                                          loop is done on the GPU)          beside the next batch's loop)

Jobs share a batch when their sampling settings match and their lengths are similar (padding a
short row to a long one wastes the engine's time), up to the engine's rows for that length, and
as many of them as pay for their batch size by the engine's measured cost (`batch_cost`). A
job is taken only when the GPU is about to run it, so one cancelled by then (client gone, timed
out) is never rendered. A batch that fails is split: each job is sampled alone, and only the
one that fails alone fails. A job may follow another (`after`, a stream's later chunks): it is
not taken before that one has started.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from indicf5.config import SamplingConfig
from indicf5.serve.metrics import Metrics
from indicf5.synth import Row, Synthesizer, urgent_stream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the inference queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # a job is itself: queue removal goes by identity
class Job:
    rows: list[Row]
    sampling: SamplingConfig
    after: Future | None = None  # taken only once this future's job has started
    future: Future = field(default_factory=Future)  # -> list[Rendered], one per row
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def frames(self) -> int:
        return max(r.frames for r in self.rows)

    def batch_key(self) -> tuple:
        s = self.sampling
        return (s.nfe, s.cfg_strength, s.sway_coef, s.schedule, s.max_frames)


class InferenceQueue:
    def __init__(
        self,
        metrics: Metrics,
        max_queue: int = 64,
        max_batch_rows: int = 8,
        max_wait_s: float = 0.01,
        length_ratio: float = 1.5,
        rows_for: Callable[[int], int] | None = None,
        batch_cost: Callable[[int, int], float | None] | None = None,
    ):
        self.metrics, self.max_queue, self.max_batch_rows = metrics, max_queue, max_batch_rows
        self.max_wait_s, self.length_ratio = max_wait_s, length_ratio
        self.rows_for = rows_for or (lambda frames: max_batch_rows)  # the engine's most rows a batch at a length
        self.batch_cost = batch_cost  # (rows, frames) -> the engine's seconds a step, None where unknown
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self.workers = 1

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, rows: list[Row], sampling: SamplingConfig, after: Future | None = None) -> Future:
        job = Job(rows, sampling, after)
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

    def _ready(self, job: Job) -> bool:
        return job.after is None or job.after.running() or job.after.done()

    def _compatible(self, first: Job, job: Job) -> bool:
        lo, hi = sorted((first.frames, job.frames))
        return self._ready(job) and job.batch_key() == first.batch_key() and hi <= self.length_ratio * lo

    def _batch(self, first: Job) -> list[Job]:
        batch, rows, frames = [], 0, 0
        for job in self._jobs:
            if not self._compatible(first, job):
                continue
            limit = min(self.max_batch_rows, self.rows_for(max(frames, job.frames)))
            if not batch or rows + len(job.rows) <= limit:
                batch.append(job)
                rows, frames = rows + len(job.rows), max(frames, job.frames)
        return batch

    def _paying(self, batch: list[Job]) -> list[Job]:
        """The oldest jobs of `batch` that render the most rows per second of the engine's cost,
        taking more rows where they come within 10% of the best: the engine runs a batch padded
        up to its next batch size, so 10 rows can cost what 16 do, while 8 of them cost half."""
        if self.batch_cost is None:
            return batch
        rates, rows, frames = [], 0, 0
        for job in batch:
            rows, frames = rows + len(job.rows), max(frames, job.frames)
            cost = self.batch_cost(rows, frames)
            if cost is None or cost <= 0:  # a shape the engine has not measured: no grounds to leave rows
                return batch
            rates.append(rows / cost)
        best = max(rates)
        return batch[: max(i for i, rate in enumerate(rates, 1) if rate >= 0.9 * best)]

    def _first(self) -> Job | None:
        return next((job for job in self._jobs if self._ready(job)), None)

    def take(self) -> list[Job]:
        """Blocks for work: the oldest ready job and the queued jobs compatible with it, marked
        running (cancelled ones are dropped). Waits up to max_wait_s for batch-mates. [] once the
        queue is closed."""
        with self._cond:
            while True:
                while self._first() is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return []
                deadline = time.monotonic() + self.max_wait_s
                while (
                    (first := self._first()) is not None
                    and (remaining := deadline - time.monotonic()) > 0
                    and sum(len(j.rows) for j in self._batch(first)) < self.max_batch_rows
                ):
                    self._cond.wait(remaining)
                if first is None:
                    continue
                batch = self._paying(self._batch(first))
                for job in batch:
                    self._jobs.remove(job)
                self._depth_changed()
                running = [job for job in batch if job.future.set_running_or_notify_cancel()]
                for job in running:
                    self.metrics.stage_seconds.labels("queue").observe(time.perf_counter() - job.submitted)
                self._cond.notify_all()  # jobs that follow these are ready now
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


@dataclass
class Sampled:
    """A batch on its way from the sampler thread to the vocoder thread."""

    jobs: list[Job]
    mels: list[list[torch.Tensor]]  # per job, per row
    done: torch.cuda.Event | None  # recorded after the batch's loop on the sampler's stream
    start: float
    began: torch.cuda.Event | None = None  # recorded before it (timing: the loop's device time)
    host_seconds: float = 0.0  # sample()'s own time: the loop's, where it ran on the CPU

    def engine_seconds(self) -> float:
        """The batch's loop on its device (its events complete: call after its mels were read)."""
        if self.began is None or self.done is None:
            return self.host_seconds
        return self.began.elapsed_time(self.done) / 1e3


class InferenceWorker(threading.Thread):
    """One device's sampler thread (this one) and vocoder thread, until the queue closes."""

    def __init__(self, queue_: InferenceQueue, synthesizer: Synthesizer):
        super().__init__(name=f"inference-{synthesizer.device}", daemon=True)
        self.queue, self.synthesizer = queue_, synthesizer
        self.cuda = torch.device(synthesizer.device).type == "cuda"
        self._sampled: queue.Queue[Sampled | None] = queue.Queue(maxsize=2)
        self._vocoder = threading.Thread(target=self._vocode_loop, name=f"vocoder-{synthesizer.device}", daemon=True)

    def run(self) -> None:
        self._vocoder.start()
        previous: torch.cuda.Event | None = None
        try:
            while True:
                if previous is not None:
                    previous.synchronize()  # the GPU ends a batch before the next is taken: late cancels count
                jobs = self.queue.take()
                if not jobs:
                    break
                with torch.inference_mode():
                    sampled = self.sample(jobs)
                previous = sampled.done
                self._sampled.put(sampled)
        finally:
            self._sampled.put(None)
            self._vocoder.join()

    def sample(self, jobs: list[Job]) -> Sampled:
        """The jobs' loops queued on the device as one batch; a failing batch of several jobs is
        split, and only a job that fails alone fails."""
        start = time.perf_counter()
        began = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if began is not None:
            began.record()
        try:
            mels = self._sample_rows(jobs)
        except Exception:
            if len(jobs) == 1:
                log.exception("inference failed for a job of %d rows", len(jobs[0].rows))
                jobs[0].future.set_exception(InferenceFailed())
                return Sampled([], [], None, start, began)
            log.warning("a batch of %d jobs failed; sampling each alone", len(jobs), exc_info=True)
            kept, mels = [], []
            for job in jobs:
                try:
                    mels.extend(self._sample_rows([job]))
                    kept.append(job)
                except Exception:
                    log.exception("inference failed for a job of %d rows", len(job.rows))
                    job.future.set_exception(InferenceFailed())
            jobs = kept
        done = torch.cuda.Event(enable_timing=True) if self.cuda and jobs else None
        if done is not None:
            done.record()
        return Sampled(jobs, mels, done, start, began, time.perf_counter() - start)

    def _sample_rows(self, jobs: list[Job]) -> list[list[torch.Tensor]]:
        rows = [row for job in jobs for row in job.rows]
        flat = self.synthesizer.sample_rows(rows, jobs[0].sampling)
        self.queue.metrics.batch_rows.observe(len(rows))
        out, i = [], 0
        for job in jobs:
            out.append(flat[i : i + len(job.rows)])
            i += len(job.rows)
        return out

    def _vocode_loop(self) -> None:
        stream = urgent_stream(self.synthesizer.device)  # ahead of the next batch's loop on the GPU
        stages = self.queue.metrics.stage_seconds
        while (sampled := self._sampled.get()) is not None:
            if not sampled.jobs:
                continue
            if sampled.done is not None:
                sampled.done.synchronize()  # the batch's loop is over: the vocoder stage times the vocoder alone
            ready = time.perf_counter()
            with torch.inference_mode(), torch.cuda.stream(stream):
                for job, mels in zip(sampled.jobs, sampled.mels):
                    try:
                        if stream is not None:
                            for mel in mels:
                                mel.record_stream(stream)  # made on the sampler's stream, freed after this one reads it
                        start = time.perf_counter()
                        stages.labels("vocoder_wait").observe(start - ready)  # behind its batch-mates' vocoding
                        rendered = self.synthesizer.vocode(mels)
                        stages.labels("vocoder").observe(time.perf_counter() - start)
                        job.future.set_result(rendered)
                    except Exception:
                        log.exception("the vocoder failed for a job of %d rows", len(mels))
                        job.future.set_exception(InferenceFailed())
            engine = sampled.engine_seconds()
            for _ in sampled.jobs:
                stages.labels("engine").observe(engine)
            seconds = time.perf_counter() - sampled.start
            self.queue.observe_batch(seconds)
            self.queue.metrics.batch_seconds.observe(seconds)


class InferenceFailed(Exception):
    """Rendering a request failed on the server (the log has the cause)."""

    def __init__(self):
        super().__init__("synthesis failed on the server for this request; the server log has the cause")
