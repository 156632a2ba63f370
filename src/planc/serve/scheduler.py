"""Admission and continuous batching: the plan's batch_size is the number of sequences in flight.

Requests are admitted up to `workload.batch_size` running sequences (the KV cache and activations
the plan sized) plus a bounded waiting queue; beyond that `submit` refuses with `QueueFull`, which
the HTTP layer turns into 429. One worker thread owns the model: each iteration it drops cancelled
requests, prefills newly admitted ones into free slots, then advances every running sequence by one
token in a single decode step. A sequence that finishes frees its slot for the next step.

Events go back to the asyncio side in one `loop.call_soon_threadsafe` per iteration (each wake-up
of the event loop takes the GIL from the decoding thread), into each job's queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from planc.serve.engine import Emitted, Engine, Sampling, Sequence

log = logging.getLogger("planc.serve")


class QueueFull(Exception):
    """Every slot runs and the waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, running: int, waiting: int, retry_after: int):
        super().__init__(f"{running} sequences in flight and {waiting} waiting (the limits)")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Failed:
    """The job's request failed with `error`; the other jobs go on."""

    error: BaseException


@dataclass
class Job:
    """One request from admission to its last token."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    stream: bool = False  # streamed requests get each token as it comes; the others all at the end
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    held: list = field(default_factory=list)  # a non-streamed request's tokens until its last
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # prefill began
    cancelled: bool = False  # set by the HTTP side when the client went away
    done: bool = False  # its last event is sent (or nobody waits for it) and its slot is free
    sequence: Sequence | None = None



class Scheduler:
    """The worker thread and its two queues (running, waiting)."""

    def __init__(self, engine: Engine, batch_size: int, max_queue: int, metrics=None):
        self.engine, self.batch_size, self.max_queue, self.metrics = engine, batch_size, max_queue, metrics
        self.running: list[Job] = []
        self.waiting: collections.deque[Job] = collections.deque()
        self.admitted = 0  # running plus being prefilled, counted under the lock
        self.condition = threading.Condition()
        self.stopping = False
        self.durations: collections.deque[float] = collections.deque(maxlen=64)
        self.outbox: list[tuple[Job, Emitted | Failed]] = []  # this iteration's events, sent together
        self.thread = threading.Thread(target=self._loop, name="planc-decode", daemon=True)

    # ------------------------------------------------------------------ the HTTP side

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue the job, or raise QueueFull when batch_size + max_queue requests are already in."""
        with self.condition:
            if self.admitted + len(self.waiting) >= self.batch_size + self.max_queue:
                raise QueueFull(self.admitted, len(self.waiting), self._retry_after())
            self.waiting.append(job)
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running one at the next step."""
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                return
            job.cancelled = True

    def counts(self) -> tuple[int, int]:
        """(sequences in flight, requests waiting)."""
        with self.condition:
            return self.admitted, len(self.waiting)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Finish what is admitted and queued, then stop the worker."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: recent request time x how many turns the queue needs."""
        typical = sorted(self.durations)[len(self.durations) // 2] if self.durations else 1.0
        turns = (len(self.waiting) + 1) / self.batch_size
        return max(1, math.ceil(typical * turns))

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and not self.running:
                    self.condition.wait()
                if self.stopping and not self.waiting and not self.running:
                    return
                admitted = []
                while self.waiting and self.admitted < self.batch_size:
                    admitted.append(self.waiting.popleft())
                    self.admitted += 1
            try:
                for job in admitted:
                    self._prefill(job)
                    self._flush()  # its first token now, not after the others' prefills
                self._step()
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave clients waiting forever
                log.exception("decode loop failed; failing the running requests")
                for job in [*self.running, *admitted]:
                    if not job.done:
                        self._finish(job, Failed(exc))
            self._flush()

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in self.outbox:
            by_loop.setdefault(job.loop, []).append((job.events, event))
        self.outbox = []
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_put_all, events)

    def _prefill(self, job: Job) -> None:
        job.started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.queue_wait.observe(job.started - job.submitted)
        try:
            job.sequence = self.engine.new_sequence(job.prompt_ids, job.max_new_tokens, job.sampling, job.stop)
            emitted = self.engine.prefill(job.sequence)
        except Exception as exc:  # noqa: BLE001 - fails this request only
            log.exception("prefill failed")
            self._finish(job, Failed(exc))
            return
        self.running.append(job)
        if self.metrics is not None:
            self.metrics.first_token.observe(time.perf_counter() - job.submitted)
        self._deliver(job, emitted)

    def _step(self) -> None:
        for job in [j for j in self.running if j.cancelled]:
            self._finish(job, None)
        if not self.running:
            return
        jobs = list(self.running)
        results = self.engine.step([job.sequence for job in jobs])
        if self.metrics is not None:
            self.metrics.decode_rows.observe(len(jobs))
        for job, result in zip(jobs, results):
            if isinstance(result, BaseException):
                log.error("request failed in a decode step: %s: %s", type(result).__name__, result,
                          exc_info=result)
                self._finish(job, Failed(result))
            else:
                self._deliver(job, result)

    def _deliver(self, job: Job, emitted: Emitted) -> None:
        if emitted.finish_reason is not None:
            self._finish(job, emitted)
        elif job.stream:
            self.outbox.append((job, emitted))
        else:  # nobody reads it before the end: no wake-up of the event loop for it
            job.held.append(emitted)

    def _finish(self, job: Job, last: Emitted | Failed | None) -> None:
        job.done = True
        if job in self.running:
            self.running.remove(job)
        job.sequence = None  # frees the KV cache now, not when the HTTP side lets go of the job
        if last is not None:
            self.outbox.extend((job, event) for event in [*job.held, last])
        job.held = []
        with self.condition:
            self.admitted -= 1
            if isinstance(last, Emitted):
                self.durations.append(time.perf_counter() - job.submitted)


def _put_all(events: list[tuple[asyncio.Queue, Emitted | Failed]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)
