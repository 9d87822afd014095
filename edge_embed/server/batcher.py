"""The one component that decides every batch a model runs.

Requests are admitted by tokens before they are tokenized, queued as texts, and packed
into batches that the model runs exactly as formed (TEI's queue is the model). Small work
is never stuck behind big work: each batch is filled least-served request first, so a
one-text request arriving behind a 240-text one rides the very next batch. One failed
batch fails only its own requests (split to find the one that fails); only repeated
failures, or a run that hangs past the run timeout, stop the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..batching import BatchLimits
from ..errors import EdgeEmbedError, ModelRunError, OverloadedError, WorkerStoppedError

__all__ = ["TokenBudgetBatcher", "BatchResult", "Ticket", "BatchObserver"]

log = logging.getLogger(__name__)

# Called after each model run: (texts, padded tokens, seconds).
BatchObserver = Callable[[int, int, float], None]
_THROUGHPUT_SMOOTHING = 0.2  # weight of the newest batch in the tokens/s estimate
# Batches handed to the model thread at once: one running, one waiting to start the moment
# it ends. More would make late small requests wait behind batches formed without them.
_PIPELINE_DEPTH = 2


@dataclass(frozen=True)
class BatchResult:
    vectors: np.ndarray  # raw pooled vectors of this request, in input order
    queue_s: float  # arrival to its first text's batch
    inference_s: float  # model time of the batches it took part in
    batch_size: int  # texts in the largest batch it took part in


class Ticket:
    """One admitted request: its token charge on the queue, then its texts' progress.

    Use as a context manager around tokenizing and `submit`: leaving it releases whatever
    charge is left and withdraws texts not yet run (the caller gave up or failed).
    """

    def __init__(self, batcher: TokenBudgetBatcher, charge: int, deadline: float | None, order: int):
        self._batcher = batcher
        self.charge = charge
        self.deadline = deadline
        self.order = order
        self.seqs: list[np.ndarray] = []
        self.future: asyncio.Future | None = None
        self.enqueued = 0.0
        self.next = 0  # next text to put in a batch
        self.done = 0  # texts computed
        self.served = 0  # tokens computed so far: the fairness key
        self.vectors: np.ndarray | None = None
        self.started: float | None = None
        self.inference_s = 0.0
        self.largest_batch = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._batcher._withdraw(self)

    async def submit(self, seqs: list[np.ndarray]) -> BatchResult:
        """Queue this request's token ids; resolve to its raw pooled vectors."""
        return await self._batcher._submit(self, seqs)

    @property
    def remaining_tokens(self) -> int:
        return sum(len(s) for s in self.seqs[self.next:])

    def alive(self, now: float) -> bool:
        return self.future is not None and not self.future.done() and (self.deadline is None or now < self.deadline)


class TokenBudgetBatcher:
    """Admission, fair batching and fault handling in front of one model's `run_batch`.

    - Admission: `admit(tokens)` refuses at once (RESOURCE_EXHAUSTED with a retry hint)
      when the queued tokens would pass `max_queue_tokens`, and `submit` refuses a request
      that cannot finish before its deadline at the measured speed.
    - Batching: texts of the queued requests, least-served request first, while rows and
      padded tokens stay within `limits`; a text longer than the token budget runs alone.
      `max_wait_s` lets a batch wait for company. Model work runs in one executor thread.
    - Faults: a failed run is split by request until the failing request is found; only
      it fails. `max_consecutive_failures` batches in a row that fail entirely, or a run
      longer than `run_timeout_s`, stop the worker: every waiting request gets
      UNAVAILABLE and `on_stop` is called (the server turns NOT_SERVING).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[np.ndarray]], np.ndarray],
        *,
        limits: BatchLimits,
        max_wait_s: float,
        max_queue_tokens: int,
        run_timeout_s: float,
        max_consecutive_failures: int,
        on_batch: BatchObserver | None = None,
        on_stop: Callable[[WorkerStoppedError], None] | None = None,
        oversize: Callable[[int, int], contextlib.AbstractAsyncContextManager] | None = None,
    ):
        self._run_batch = run_batch
        self.limits = limits
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self.run_timeout_s = run_timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self._on_batch = on_batch
        self._on_stop = on_stop
        self._oversize = oversize
        self._active: list[Ticket] = []  # submitted, not finished, in arrival order
        self.queued_tokens = 0
        self._order = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-embed-model")
        self.stopped: WorkerStoppedError | None = None
        self.hung = False
        self.running_since: float | None = None  # set by the model thread while a run is on
        self._running: set[asyncio.Task] = set()  # batches handed to the model thread
        self.tokens_per_s: float | None = None
        self.consecutive_failures = 0
        self.last_failure = ""

    # -- figures ----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests queued or partly computed."""
        return len(self._active)

    def retry_after_ms(self) -> int:
        """A hint for refused callers: roughly how long the queued work takes to drain."""
        speed = self.tokens_per_s or 2000.0
        return int(min(30_000, max(10, 1000 * (self.queued_tokens / speed + self.max_wait_s))))

    def overdue(self, now: float | None = None) -> bool:
        """Whether the model run in progress has passed the run timeout."""
        started = self.running_since
        return started is not None and (now or time.monotonic()) - started > self.run_timeout_s

    # -- requests ---------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="edge-embed-batcher")

    def admit(self, tokens: int, deadline: float | None = None) -> Ticket:
        """Reserve `tokens` (an upper bound, before tokenizing) of queue room, or refuse now."""
        if self.stopped is not None:
            raise self.stopped
        if self._task is None:
            raise WorkerStoppedError("the model worker is not running")
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            hint = self.retry_after_ms()
            raise OverloadedError(
                f"the queue holds {self.queued_tokens:,} tokens and this request up to {tokens:,} more; "
                f"the limit is {self.max_queue_tokens:,}: retry after {hint} ms", retry_after_ms=hint)
        ticket = Ticket(self, tokens, deadline, next(self._order))
        self.queued_tokens += tokens
        return ticket

    async def _submit(self, ticket: Ticket, seqs: list[np.ndarray]) -> BatchResult:
        if self.stopped is not None:
            raise self.stopped
        real = sum(len(s) for s in seqs)
        self.queued_tokens += real - ticket.charge  # the bound becomes the real count
        ticket.charge, ticket.seqs = real, seqs
        now = time.monotonic()
        if ticket.deadline is not None and self.tokens_per_s and self._active:
            # Least-served-first shares the model like processor sharing: this request
            # finishes after its own tokens plus, from each queued one, at most as many.
            share = real + sum(min(t.remaining_tokens, real) for t in self._active)
            eta = share / self.tokens_per_s
            if now + eta > ticket.deadline:
                hint = self.retry_after_ms()
                raise OverloadedError(
                    f"this request's {real:,} tokens would take about {eta:.1f} s behind the queued work, past "
                    f"its deadline in {ticket.deadline - now:.1f} s: retry after {hint} ms", retry_after_ms=hint)
        ticket.future = asyncio.get_running_loop().create_future()
        ticket.enqueued = now
        if not seqs:
            ticket.future.set_result(BatchResult(np.empty((0, 0), np.float32), 0.0, 0.0, 0))
        else:
            self._active.append(ticket)
            self._wakeup.set()
        return await ticket.future

    def _withdraw(self, ticket: Ticket) -> None:
        """Release the rest of a ticket's charge; drop it from the queue if still there."""
        self._release(ticket, ticket.charge)  # a finished request has nothing left to release
        if ticket in self._active:
            self._active.remove(ticket)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.cancel()

    def _release(self, ticket: Ticket, tokens: int) -> None:
        tokens = min(tokens, ticket.charge)
        ticket.charge -= tokens
        self.queued_tokens -= tokens

    # -- the consumer -----------------------------------------------------------------

    async def _consume(self) -> None:
        """Form batches and keep the model thread fed: while one batch runs, the next one
        waits in the executor, so the thread never idles for an event-loop round trip."""
        watch = asyncio.get_running_loop().create_task(self._watch_runs(), name="edge-embed-run-timeout")
        try:
            while self.stopped is None:
                await self._wait_for_work()
                batch = self._form_batch()
                if batch:
                    task = asyncio.get_running_loop().create_task(self._run(batch))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)  # also when cancelled before it starts
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave callers waiting
            log.exception("the batcher failed")
            self._stop(WorkerStoppedError(f"the model worker stopped: {exc!r}"))
        finally:
            watch.cancel()

    async def _watch_runs(self) -> None:
        """Stop the worker when a model run passes the run timeout (it can never be
        interrupted: only a process restart frees its thread)."""
        period = min(1.0, self.run_timeout_s / 4)
        while self.stopped is None:
            await asyncio.sleep(period)
            if self.overdue():
                self.hung = True
                self._stop(WorkerStoppedError(
                    f"a model run did not finish within the run timeout of {self.run_timeout_s:g} s; "
                    "the worker is hung"))

    async def _wait_for_work(self) -> None:
        while not self._schedulable() or len(self._running) >= _PIPELINE_DEPTH:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.max_wait_s <= 0:
            return
        closes = min(t.enqueued for t in self._active) + self.max_wait_s
        while (left := closes - time.monotonic()) > 0 and not self._budget_filled():
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                break

    def _schedulable(self) -> bool:
        return any(t.next < len(t.seqs) for t in self._active)

    def _budget_filled(self) -> bool:
        rows = sum(len(t.seqs) - t.next for t in self._active)
        return rows >= self.limits.max_batch_size or self.queued_tokens >= self.limits.max_batch_tokens

    def _form_batch(self) -> list[tuple[Ticket, int]]:
        """Texts for one run: least-served request first, within rows and padded tokens."""
        now = time.monotonic()
        for ticket in [t for t in self._active if not t.alive(now)]:
            self._drop(ticket)
        heap = [(t.served, t.order, t) for t in self._active if t.next < len(t.seqs)]
        heapq.heapify(heap)
        batch: list[tuple[Ticket, int]] = []
        width = 0
        while heap and len(batch) < self.limits.max_batch_size:
            served, order, ticket = heapq.heappop(heap)
            length = len(ticket.seqs[ticket.next])
            if batch and not self.limits.fits(len(batch) + 1, max(width, length)):
                continue  # this request's next text does not fit; others' may
            batch.append((ticket, ticket.next))
            ticket.next += 1
            width = max(width, length)
            if ticket.next < len(ticket.seqs):
                heapq.heappush(heap, (served + length, order, ticket))
        for ticket, index in batch:
            ticket.served += len(ticket.seqs[index])
        return batch

    def _drop(self, ticket: Ticket) -> None:
        """A request whose caller went away or whose deadline passed: no more compute."""
        self._active.remove(ticket)
        self._release(ticket, ticket.charge)
        if not ticket.future.done():
            ticket.future.cancel()

    async def _run(self, batch: list[tuple[Ticket, int]]) -> None:
        """One batch in the pipeline. Its slot is freed, and the consumer woken, on every way
        out: a done-callback would free it a loop turn after the wake-up, and a consumer
        that looked in between would sleep with texts queued until a new request came."""
        try:
            await self._run_and_count(batch)
        finally:
            self._running.discard(asyncio.current_task())
            self._wakeup.set()

    async def _run_and_count(self, batch: list[tuple[Ticket, int]]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self._oversize is not None and not self.limits.fits(len(batch), _width(batch)):
                # A text longer than the token budget runs alone; its memory is reserved first.
                try:
                    await stack.enter_async_context(self._oversize(len(batch), _width(batch)))
                except EdgeEmbedError as exc:
                    for ticket in dict.fromkeys(t for t, _ in batch):
                        self._fail(ticket, exc)
                    return
            succeeded = await self._run_split(batch)
        if self.stopped is not None:
            return
        if succeeded:
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.max_consecutive_failures:
                self._stop(WorkerStoppedError(
                    f"the model failed {self.consecutive_failures} batches in a row; the worker stopped "
                    f"(last failure: {self.last_failure})"))

    async def _run_split(self, batch: list[tuple[Ticket, int]]) -> bool:
        """Run a batch; if it fails, run each half of its requests apart. True if any ran."""
        try:
            vectors, seconds = await self._execute([t.seqs[i] for t, i in batch])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - run_batch raises EdgeEmbedError; a bug is a failure too
            if self.stopped is not None:
                return False
            error = exc if isinstance(exc, EdgeEmbedError) else ModelRunError(f"the model run failed: {exc!r}")
            self.last_failure = str(error)
            owners = list(dict.fromkeys(t for t, _ in batch))
            if len(owners) == 1:
                log.warning("a batch of %d texts failed: %s", len(batch), error)
                self._fail(owners[0], error)
                return False
            half = set(owners[: len(owners) // 2])
            first = await self._run_split([row for row in batch if row[0] in half])
            second = await self._run_split([row for row in batch if row[0] not in half])
            return first or second
        self._deliver(batch, vectors, seconds)
        return True

    def _timed_run(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """In the model thread: one run, its start visible to the run-timeout watch."""
        started = self.running_since = time.monotonic()
        try:
            return self._run_batch(seqs), time.monotonic() - started
        finally:
            self.running_since = None

    async def _execute(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        loop = asyncio.get_running_loop()
        vectors, seconds = await loop.run_in_executor(self._executor, self._timed_run, seqs)
        if len(vectors) != len(seqs):
            raise ModelRunError(f"the model returned {len(vectors)} vectors for {len(seqs)} texts")
        tokens = len(seqs) * max(len(s) for s in seqs)
        if seconds > 0.001:
            speed = tokens / seconds
            self.tokens_per_s = speed if self.tokens_per_s is None else (
                (1 - _THROUGHPUT_SMOOTHING) * self.tokens_per_s + _THROUGHPUT_SMOOTHING * speed)
        if self._on_batch is not None:
            self._on_batch(len(seqs), tokens, seconds)
        return vectors, seconds

    def _deliver(self, batch: list[tuple[Ticket, int]], vectors: np.ndarray, seconds: float) -> None:
        started = time.monotonic() - seconds
        for row, (ticket, index) in enumerate(batch):
            if ticket.vectors is None:
                ticket.vectors = np.empty((len(ticket.seqs), vectors.shape[1]), dtype=np.float32)
                ticket.started = started
            ticket.vectors[index] = vectors[row]
            ticket.done += 1
            self._release(ticket, len(ticket.seqs[index]))
        for ticket in dict.fromkeys(t for t, _ in batch):
            ticket.inference_s += seconds
            ticket.largest_batch = max(ticket.largest_batch, len(batch))
            if ticket.done == len(ticket.seqs) and ticket in self._active:
                self._active.remove(ticket)
                if not ticket.future.done():
                    ticket.future.set_result(BatchResult(
                        ticket.vectors, ticket.started - ticket.enqueued, ticket.inference_s, ticket.largest_batch))

    def _fail(self, ticket: Ticket, error: BaseException) -> None:
        if ticket in self._active:
            self._active.remove(ticket)
        self._release(ticket, ticket.charge)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.set_exception(error)

    def _stop(self, error: WorkerStoppedError) -> None:
        """The worker is done for: fail everything waiting, tell the server."""
        if self.stopped is not None:
            return
        log.error("%s", error)
        self.stopped = error
        for ticket in list(self._active):
            self._fail(ticket, error)
        for task in list(self._running):
            if task is not asyncio.current_task():
                task.cancel()  # a hung run's waiter would wait forever
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._on_stop is not None:
            self._on_stop(error)

    async def stop(self) -> None:
        """Finish what is queued, then stop the consumer and the executor.

        After a hung run the executor thread cannot be joined; it is abandoned.
        """
        if self._task is not None and self.stopped is None:
            while self._active or self._running:
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=not self.hung, cancel_futures=True)


def _width(batch: list[tuple[Ticket, int]]) -> int:
    return max(len(t.seqs[i]) for t, i in batch)
