"""The scheduler: one thread owns the engine (the NumPy/C engine is not re-entrant) and runs `Batch` steps.

Requests wait in a bounded queue; between steps the scheduler admits them into free slots (prefix reuse
picks the slot whose cache already holds the longest prefix of the prompt), drops those that were
cancelled (a client gone, a stop string met) or ran past their time limit, and after each step hands every
new token to its request's event queue on the asyncio side. `Batch` orders a step (decode first, prompts
in chunks) and keeps each sequence's arithmetic independent of the others.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine import Engine
from ..errors import BabyLlamaError
from ..generate import Batch, Sequence
from ..sampler import Sampler, top_logprobs
from ..tokenizer import BOS, EOS
from .metrics import Metrics

STOP_IDS = frozenset({BOS, EOS})  # end of text (run.c stops at BOS) or of a chat reply


class QueueFull(Exception):
    """More requests wait than the queue holds: the client should retry later (HTTP 429)."""


class SchedulerFailed(Exception):
    """The scheduler thread has died (a bug, in the server's log): no job would ever run, so none is taken."""


@dataclass
class Token:
    """One generated token, with its log-probabilities when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """The end of one choice: reason "stop" (a stop token), "length" (max_tokens or the context), "timeout"
    (the server's time limit) or "error" (the model's arithmetic failed, `message` says how, or the scheduler
    failed); the HTTP side adds "shutdown" (the server is stopping)."""

    reason: str
    message: str | None = None


@dataclass
class Job:
    """One sequence to generate (a choice of a request), and where its events go."""

    prompt: list[int]
    max_new: int
    sampler: Sampler
    emit: Callable[[int, object], None]  # (choice index, Token | Finished), called from the scheduler thread
    index: int = 0
    logprobs: int | None = None  # top-k log-probabilities to report per token; None: none
    deadline: float = float("inf")  # time.monotonic() after which the job is ended ("timeout")
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    seq: Sequence | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:
        """Ask the scheduler to stop this job (thread-safe: it is looked at between steps)."""
        self.cancelled = True


class Scheduler:
    def __init__(self, engine: Engine, slots: int, queue_size: int, metrics: Metrics,
                 max_tokens_per_step: int = 128, prefix_min: int = 16):
        # the whole context's cache for every slot, which start-up checked fits (cli/serve.py): made at once (its
        # pages taken as they fill), so that no step of a running request grows it, or fails to; a model error one
        # sequence's numbers cause (an fp16 cache overflow, NaN logits) ends that sequence's request only: the
        # others sharing its steps go on
        self.batch = Batch(engine, slots, max_tokens_per_step=max_tokens_per_step, prefix_min=prefix_min,
                           seq_len=engine.args.max_seq_len, isolate_failures=True)
        self.slots = slots
        self.queue_size = queue_size
        self.metrics = metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="babyllama-scheduler", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ the asyncio side

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Tell the thread to stop, and (`wait`) wait for the step it is in to end."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if wait:
            self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs together, or raise QueueFull when more jobs would wait for a slot than the
        queue holds (jobs that find a free slot do not wait: they are admitted at the next step), or
        SchedulerFailed once the scheduler thread has died (queued jobs would wait forever: nothing ends them)."""
        with self._cond:
            if self.error is not None:
                raise SchedulerFailed
            free = self.slots - len(self.running)
            if len(self.waiting) + len(jobs) - free > self.queue_size:
                raise QueueFull
            self.waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cond.notify()

    def wake(self) -> None:
        """Look at cancellations now (a cancelled job waiting in the queue holds nothing, but is counted)."""
        with self._cond:
            self._cond.notify()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def status(self) -> dict:
        with self._cond:
            return {"slots": self.slots, "active": len(self.running), "queued": len(self.waiting)}

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.running and not self.waiting:
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._drop_ended(time.monotonic())
                    self._admit()
                    self._publish_gauges()
                if self.running:
                    try:
                        self._step()
                    except BabyLlamaError as e:  # the model, where Batch could not tell which sequence's
                        self._fail_running(str(e))
        except BaseException as e:  # noqa: BLE001 - a bug: reported by /health, and every waiting job ends
            self.error = e
            with self._cond:
                for job in [*self.running, *self.waiting]:
                    job.emit(job.index, Finished("error"))
                self.running.clear()  # ended: /health and the gauges no longer count them
                self.waiting.clear()
                self._publish_gauges()
            raise

    def _admit(self) -> None:
        while self.waiting and self.batch.free_slots:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            job.seq = self.batch.add(Sequence(list(job.prompt), job.sampler, self.batch.seq_len, STOP_IDS,
                                              max_new=job.max_new))
            self.metrics.prefix_reused.inc(job.seq.n_reused)
            self.metrics.prefilled.inc(len(job.prompt) - job.seq.n_reused)
            self.running.append(job)

    def _drop_ended(self, now: float) -> None:
        for job in [j for j in self.waiting if j.cancelled or now > j.deadline]:
            self.waiting.remove(job)
            if not job.cancelled:
                job.emit(job.index, Finished("timeout"))
        for job in [j for j in self.running if j.cancelled or now > j.deadline]:
            self._finish(job, "cancelled" if job.cancelled else "timeout")

    def _finish(self, job: Job, reason: str, deliveries: Deliveries | None = None, message: str | None = None) -> None:
        seq = _running_seq(job)
        self.batch.release(seq)
        self.running.remove(job)
        if reason == "cancelled":
            return
        event = Finished(reason, message)
        if deliveries is not None:
            deliveries.add(job, event)
        else:
            job.emit(job.index, event)

    def _fail_running(self, message: str) -> None:
        """End every job of a step that raised with an error that says why; the server goes on. Their slots'
        cache rows are not offered as a prefix again (a failed step may have written some of them)."""
        with self._cond:
            for job in list(self.running):
                seq = _running_seq(job)
                seq.n_fed = 0  # nothing in its slot is offered as a reusable prefix
                self.batch.release(seq)
                self.running.remove(job)
                job.emit(job.index, Finished("error", message))
            self._publish_gauges()

    def _step(self) -> None:
        out = self.batch.step()
        now = time.monotonic()
        self.metrics.generated.inc(len(out))
        by_seq = {id(job.seq): job for job in self.running}
        deliveries = Deliveries()
        for seq, token in out:
            job = by_seq[id(seq)]
            if job.last_token_at is None:
                self.metrics.ttft.observe(now - job.submitted)
            else:
                self.metrics.token_latency.observe(now - job.last_token_at)
            job.last_token_at = now
            logprob, top = (None, None)
            if job.logprobs is not None:
                assert seq.logits is not None  # the row its new token was sampled from
                logprob, top = top_logprobs(seq.logits, token, job.logprobs)
            deliveries.add(job, Token(token, logprob, top))
        with self._cond:
            for job in [j for j in self.running if _running_seq(j).done]:
                seq = _running_seq(job)
                self._finish(job, seq.stop_reason or "length", deliveries, seq.error)
            self._publish_gauges()  # the loop may now sleep until the next request: the gauges must be true
        deliveries.send()

    def _publish_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.active_slots.set(len(self.running))


def _running_seq(job: Job) -> Sequence:
    """A running job's sequence (set when it was admitted)."""
    assert job.seq is not None
    return job.seq


class Emitter:
    """A job's `emit` that puts (choice index, event) on an asyncio queue from the scheduler thread. A step's
    events for every job go over in one hand-off (`Deliveries`): waking the event loop once per token and
    stream costs more than the small model's step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def __call__(self, index: int, event: object) -> None:
        hand_over(self.loop, [(self.queue, (index, event))])


class Deliveries:
    """One step's events, handed to each event loop at once (jobs with another `emit` get theirs directly)."""

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[int, object]]]] = {}

    def add(self, job: Job, event: object) -> None:
        emit = job.emit
        if isinstance(emit, Emitter):
            self.by_loop.setdefault(emit.loop, []).append((emit.queue, (job.index, event)))
        else:
            emit(job.index, event)

    def send(self) -> None:
        for loop, items in self.by_loop.items():
            hand_over(loop, items)


def hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, tuple[int, object]]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the event loop has closed (the server is shutting down): nobody is listening
        pass


def _put_all(items: list[tuple[asyncio.Queue, tuple[int, object]]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
