"""The one component that decides every batch a model runs.

Requests are admitted by tokens before they are tokenized, queued as texts, and packed
into batches that the model runs exactly as formed (TEI's queue is the model). One policy
forms every batch, here and in process (`plan_batches`): texts of about the same length
(each at least half the widest) within the token budget. Small work is never stuck behind
big work: the least-served request sets the batch's width and fills it first, so a
one-text request arriving behind a 240-text one rides the very next batch. One failed
batch fails only its own requests (split to find the one that fails); a failure pinned on
a request's input (the rest of the batch ran, or a known-good canary batch runs) fails that
request with a non-retryable error and does not count against the worker; only repeated
failures that cannot be pinned, or a run that hangs past the run timeout, stop the worker.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..batching import BatchLimits
from ..errors import EdgeEmbedError, InputRunError, ModelRunError, OverloadedError, WorkerStoppedError

__all__ = ["TokenBudgetBatcher", "BatchResult", "Ticket", "BatchObserver", "REQUEST_ID"]

log = logging.getLogger(__name__)

# The id of the request being handled, set by the transport at its boundary: errors that
# clients see carry it, and the log line with the detail does too.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("edge_embed_request_id", default="-")

# Called after each model run: (texts, padded tokens, real tokens, seconds).
BatchObserver = Callable[[int, int, int, float], None]
# A request whose bound does not fit the queue now waits for room at most this long (or
# half the time left to its deadline, if sooner) before it is refused with an honest hint.
_ADMISSION_WAIT_S = 2.0
_THROUGHPUT_SMOOTHING = 0.2  # weight of the newest batch in the tokens/s estimate
# Batches handed to the model thread at once: one running, one waiting to start the moment
# it ends. The waiting one is formed again when a request arrives before it starts, so a
# late small request waits for one batch at most, never for one formed without it.
_PIPELINE_DEPTH = 2
# Batches in a row a waiting request may give no text to (its lengths did not fit their
# widths) before it sets the width of the next one itself.
_MAX_PASSED_OVER = 2


class _Preempted(asyncio.CancelledError):
    """A batch taken back before the model thread started it: its texts queue again."""


class _OwnersGone(Exception):
    """Raised on the model thread: every request of a batch gave up before it started."""


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
        self.request_id = REQUEST_ID.get()
        self.seqs: list[np.ndarray] = []
        self.future: asyncio.Future | None = None
        self.enqueued = 0.0
        # Texts not yet put in a batch, longest first, and their lengths negated (for bisect).
        self.pending: list[int] = []
        self._pending_keys: list[int] = []
        self.done = 0  # texts computed
        self.passed_over = 0  # batches formed in a row while it waited and gave no text
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
        return -sum(self._pending_keys)

    def _queue(self, seqs: list[np.ndarray]) -> None:
        self.seqs = seqs
        self.pending = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: ties keep input order
        self._pending_keys = [-len(seqs[i]) for i in self.pending]

    def longest_pending(self) -> int:
        return -self._pending_keys[0]

    def put_back(self, index: int) -> None:
        """Queue text `index` again (its batch was taken back before it ran)."""
        key = -len(self.seqs[index])
        at = bisect.bisect_left(self._pending_keys, key)
        while at < len(self.pending) and self._pending_keys[at] == key and self.pending[at] < index:
            at += 1
        self.pending.insert(at, index)
        self._pending_keys.insert(at, key)
        self.served -= len(self.seqs[index])

    def take(self, shortest: int, longest: int) -> int | None:
        """Remove and return the longest waiting text with shortest <= length <= longest."""
        at = bisect.bisect_left(self._pending_keys, -longest)
        if at == len(self.pending) or -self._pending_keys[at] < shortest:
            return None
        del self._pending_keys[at]
        return self.pending.pop(at)

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
      `max_batch_s` (0: off) narrows the token budget to what the measured speed runs in
      that long, so a request arriving during a batch waits for about that at most.
    - Faults: a failed run is split by request until the failing request is found; only
      it fails. When the rest of the batch ran, or `canary` (token ids known to run) runs
      right after, the failure is the input's: InputRunError, not retryable, not counted.
      `max_consecutive_failures` batches in a row that fail with the model at fault, or a
      run longer than `run_timeout_s`, stop the worker: every waiting request gets
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
        canary: Sequence[np.ndarray] | None = None,
        max_batch_s: float = 0.0,
    ):
        self._run_batch = run_batch
        self._canary = list(canary) if canary else None
        self.max_batch_s = max_batch_s
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
        self._room_waiters: list[asyncio.Future] = []  # requests waiting for queue room
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-embed-model")
        self.stopped: WorkerStoppedError | None = None
        self.hung = False
        self.running_since: float | None = None  # set by the model thread while a run is on
        self._running: set[asyncio.Task] = set()  # batches handed to the model thread
        self._not_started: concurrent.futures.Future | None = None  # a batch waiting for the model thread
        self.tokens_per_s: float | None = None
        self.batch_cost = BatchCost()
        self.consecutive_failures = 0
        self.last_failure = ""

    # -- figures ----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests queued or partly computed."""
        return len(self._active)

    def retry_after_ms(self, tokens: int = 0) -> int:
        """A hint for refused callers: roughly how long until the queue has room for
        `tokens` more (all of it drained, for a request bigger than the queue limit)."""
        speed = self.tokens_per_s or 2000.0
        return int(min(30_000, max(10, 1000 * (self._excess(tokens) / speed + self.max_wait_s))))

    def _excess(self, tokens: int) -> int:
        """Queued tokens that must drain before `tokens` more are admitted."""
        if tokens > self.max_queue_tokens:
            return self.queued_tokens
        return max(0, self.queued_tokens + tokens - self.max_queue_tokens)

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
        ticket = self.try_admit(tokens, deadline)
        if ticket is None:
            raise self.full_error(tokens)
        return ticket

    def try_admit(self, tokens: int, deadline: float | None = None) -> Ticket | None:
        """Reserve `tokens` of queue room if there is room now; None if there is not."""
        if self.stopped is not None:
            raise self.stopped
        if self._task is None:
            raise WorkerStoppedError("the model worker is not running")
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            return None
        ticket = Ticket(self, tokens, deadline, next(self._order))
        self.queued_tokens += tokens
        return ticket

    async def admit_when_room(self, tokens: int, deadline: float | None = None) -> Ticket:
        """Reserve `tokens` (a real count) of queue room, waiting for the queue to drain
        enough while that can happen before the deadline (and within a bounded wait);
        else refuse with a hint of when there will be room."""
        started = time.monotonic()
        # Half of what is left before the deadline at most: the other half is for the run.
        wait_s = _ADMISSION_WAIT_S if deadline is None else min(_ADMISSION_WAIT_S, (deadline - started) / 2)
        give_up = started + wait_s
        while (ticket := self.try_admit(tokens, deadline)) is None:
            now = time.monotonic()
            if self.tokens_per_s is None:
                raise self.full_error(tokens)  # no run measured yet: nothing says the queue drains in time
            if now + self._excess(tokens) / self.tokens_per_s >= give_up:
                raise self.full_error(tokens)
            room = asyncio.get_running_loop().create_future()
            self._room_waiters.append(room)
            try:
                await asyncio.wait_for(room, give_up - now)
            except asyncio.TimeoutError:
                raise self.full_error(tokens) from None
            finally:
                if room in self._room_waiters:
                    self._room_waiters.remove(room)
        return ticket

    def full_error(self, tokens: int) -> OverloadedError:
        """The refusal of `tokens` more for a full queue, with a hint of when they fit."""
        hint = self.retry_after_ms(tokens)
        return OverloadedError(
            f"the queue holds {self.queued_tokens:,} tokens and this request {tokens:,} more; "
            f"the limit is {self.max_queue_tokens:,}: retry after {hint} ms", retry_after_ms=hint, cause="queue")

    async def _submit(self, ticket: Ticket, seqs: list[np.ndarray]) -> BatchResult:
        if self.stopped is not None:
            raise self.stopped
        real = sum(len(s) for s in seqs)
        self.queued_tokens += real - ticket.charge  # the bound becomes the real count
        ticket.charge = real
        ticket._queue(seqs)
        self._wake_room_waiters()
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
                    f"its deadline in {ticket.deadline - now:.1f} s: retry after {hint} ms", retry_after_ms=hint,
                    cause="deadline")
        ticket.future = asyncio.get_running_loop().create_future()
        ticket.enqueued = now
        if not seqs:
            ticket.future.set_result(BatchResult(np.empty((0, 0), np.float32), 0.0, 0.0, 0))
        else:
            self._active.append(ticket)
            waiting = self._not_started
            if waiting is not None and waiting.cancel():  # not started: form it again with this request
                self._not_started = None
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
        if tokens:
            self._wake_room_waiters()

    def _wake_room_waiters(self) -> None:
        for room in self._room_waiters:
            if not room.done():
                room.set_result(None)
        self._room_waiters.clear()

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
        return any(t.pending for t in self._active)

    def _budget_filled(self) -> bool:
        rows = sum(len(t.pending) for t in self._active)
        return rows >= self.limits.max_batch_size or self.queued_tokens >= self.limits.max_batch_tokens

    def _form_batch(self) -> list[tuple[Ticket, int]]:
        """Texts for one run, by `plan_batches`' rule: one request's longest waiting text
        sets the width; texts from 1/2 of it up to it fill the rows the budget allows,
        least-served request first (each gives its longest that fit).

        The width is set by the least-served request, unless a request has had no text in
        `_MAX_PASSED_OVER` batches in a row (its texts were all too long or too short for
        their widths): then it sets the width, so steady short traffic cannot starve long
        texts, nor long traffic short ones.
        """
        now = time.monotonic()
        for ticket in [t for t in self._active if not t.alive(now)]:
            self._drop(ticket)
        waiting = [t for t in self._active if t.pending]
        if not waiting:
            return []
        starved = [t for t in waiting if t.passed_over >= _MAX_PASSED_OVER]
        first = (max(starved, key=lambda t: (t.passed_over, -t.order)) if starved
                 else min(waiting, key=lambda t: (t.served, t.order)))
        width = first.longest_pending()
        rows, shortest = self._limits_now(width).rows_for(width), (width + 1) // 2
        batch: list[tuple[Ticket, int]] = [(first, first.take(shortest, width))]
        heap = [(t.served + (len(first.seqs[batch[0][1]]) if t is first else 0), t.order, t)
                for t in waiting if t.pending]
        heapq.heapify(heap)
        while heap and len(batch) < rows:
            served, order, ticket = heapq.heappop(heap)
            index = ticket.take(shortest, width)
            if index is None:
                continue  # nothing of this request's fits this batch's width
            batch.append((ticket, index))
            if ticket.pending:
                heapq.heappush(heap, (served + len(ticket.seqs[index]), order, ticket))
        for ticket, index in batch:
            ticket.served += len(ticket.seqs[index])
        chosen = {t for t, _ in batch}
        for ticket in waiting:
            ticket.passed_over = 0 if ticket in chosen else ticket.passed_over + 1
        return batch

    def _limits_now(self, width: int) -> BatchLimits:
        """The limits, with the token budget cut to what runs in `max_batch_s` by the
        measured cost model (never below one text of `width`); uncut where the model is
        not known yet or a batch's fixed cost is a large part of the target (a GPU, say,
        where small batches cost nearly as much as full ones)."""
        budget = self.batch_cost.tokens_within(self.max_batch_s) if self.max_batch_s else None
        if budget is None or budget >= self.limits.max_batch_tokens:
            return self.limits
        return dataclasses.replace(self.limits, max_batch_tokens=max(width, budget))

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
        except _Preempted:
            for ticket, index in batch:
                ticket.put_back(index)
        finally:
            self._running.discard(asyncio.current_task())
            self._wakeup.set()

    async def _run_and_count(self, batch: list[tuple[Ticket, int]]) -> None:
        failures: list[tuple[Ticket, EdgeEmbedError]] = []
        async with contextlib.AsyncExitStack() as stack:
            if self._oversize is not None and not self.limits.fits(len(batch), _width(batch)):
                # A text longer than the token budget runs alone; its memory is reserved first.
                try:
                    await stack.enter_async_context(self._oversize(len(batch), _width(batch)))
                except EdgeEmbedError as exc:
                    for ticket in dict.fromkeys(t for t, _ in batch):
                        self._fail(ticket, exc)
                    return
            ran = await self._run_split(batch, failures)
        if self.stopped is not None:
            return
        if not failures:
            self.consecutive_failures = 0
            return
        # Pinned on the inputs when the rest of the batch ran, or the model runs a canary now.
        pinned = ran or await self._canary_runs()
        if self.stopped is not None:
            return
        for ticket, error in failures:
            log.warning("request %s: a batch of its %d texts failed%s: %s", ticket.request_id, len(ticket.seqs),
                        " on its input" if pinned else "", error)
            self._fail(ticket, InputRunError(
                f"the model fails on this request's input (request {ticket.request_id}); the same input fails "
                "again") if pinned else ModelRunError(
                f"the model run failed (request {ticket.request_id}); it may succeed on a retry"))
        if pinned:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures:
            log.error("the model failed %d batches in a row; the last failure: %s", self.consecutive_failures,
                      self.last_failure)
            self._stop(WorkerStoppedError(
                f"the model failed {self.consecutive_failures} batches in a row and the worker stopped (the server "
                "log has the failures); a restart is needed"))

    async def _run_split(self, batch: list[tuple[Ticket, int]],
                         failures: list[tuple[Ticket, EdgeEmbedError]]) -> bool:
        """Run a batch; if it fails, run each half of its requests apart, down to the one
        request that fails (put in `failures`). True if any part ran."""
        try:
            vectors, seconds = await self._execute([t.seqs[i] for t, i in batch], preemptible=not failures,
                                                   owners=list(dict.fromkeys(t for t, _ in batch)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - run_batch raises EdgeEmbedError; a bug is a failure too
            if self.stopped is not None:
                return False
            error = exc if isinstance(exc, EdgeEmbedError) else ModelRunError(f"the model run failed: {exc!r}")
            self.last_failure = str(error)
            owners = list(dict.fromkeys(t for t, _ in batch))
            if len(owners) == 1:
                failures.append((owners[0], error))
                return False
            half = set(owners[: len(owners) // 2])
            first = await self._run_split([row for row in batch if row[0] in half], failures)
            second = await self._run_split([row for row in batch if row[0] not in half], failures)
            return first or second
        self._deliver(batch, vectors, seconds)
        return True

    async def _canary_runs(self) -> bool:
        """Whether the model runs a batch known to run: then a failure was its input's."""
        if self._canary is None:
            return False
        try:
            await self._execute(self._canary, observe=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model is at fault: that is the answer
            log.warning("the model failed its canary batch too: %s", exc)
            return False
        return True

    def _timed_run(self, seqs: list[np.ndarray], owners: list[Ticket] | None = None) -> tuple[np.ndarray, float]:
        """In the model thread: one run, its start visible to the run-timeout watch; none
        when every owner gave up while the batch waited for the thread."""
        if owners and not any(t.alive(time.monotonic()) for t in owners):
            raise _OwnersGone()
        started = self.running_since = time.monotonic()
        try:
            return self._run_batch(seqs), time.monotonic() - started
        finally:
            self.running_since = None

    async def _execute(self, seqs: list[np.ndarray], *, observe: bool = True, preemptible: bool = False,
                       owners: list[Ticket] | None = None) -> tuple[np.ndarray, float]:
        """Run `seqs` on the model thread. A `preemptible` batch that has not started when
        a new request arrives, or whose `owners` all gave up (deadline, cancel) before it
        started, is taken back (`_Preempted`) and formed again."""
        run = self._executor.submit(self._timed_run, seqs, owners if preemptible else None)
        if preemptible:
            self._not_started = run
        try:
            vectors, seconds = await asyncio.wrap_future(run)
        except _OwnersGone:
            raise _Preempted() from None
        except asyncio.CancelledError:
            if run.cancelled() and preemptible:
                raise _Preempted() from None
            raise
        finally:
            if self._not_started is run:
                self._not_started = None
        if len(vectors) != len(seqs):
            raise ModelRunError(f"the model returned {len(vectors)} vectors for {len(seqs)} texts")
        tokens = len(seqs) * max(len(s) for s in seqs)
        if observe:
            self.batch_cost.observe(tokens, seconds)
        if seconds > 0.001 and observe:
            speed = tokens / seconds
            self.tokens_per_s = speed if self.tokens_per_s is None else (
                (1 - _THROUGHPUT_SMOOTHING) * self.tokens_per_s + _THROUGHPUT_SMOOTHING * speed)
        if self._on_batch is not None and observe:
            self._on_batch(len(seqs), tokens, sum(len(s) for s in seqs), seconds)
        return vectors, seconds

    def _deliver(self, batch: list[tuple[Ticket, int]], vectors: np.ndarray, seconds: float) -> None:
        started = time.monotonic() - seconds
        for row, (ticket, index) in enumerate(batch):
            if ticket.vectors is None:  # [n, dim] floats, or n matrices (a multi-vector model's)
                ticket.vectors = np.empty((len(ticket.seqs), *vectors.shape[1:]), dtype=vectors.dtype)
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


class BatchCost:
    """seconds = fixed + per_token x padded tokens, fitted over recent batches (decayed
    least squares): what a batch of N tokens costs on this device, where speed in tokens/s
    alone would make small batches look slow and keep batches small."""

    _DECAY = 0.95  # the weight an older batch keeps at each new one

    def __init__(self) -> None:
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self._DECAY
        self._n, self._x, self._y = d * self._n + 1, d * self._x + tokens, d * self._y + seconds
        self._xx, self._xy = d * self._xx + tokens * tokens, d * self._xy + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed s, s per token), or None while the batches seen vary too little in size."""
        if self._n < 3:
            return None
        mx, my = self._x / self._n, self._y / self._n
        var = self._xx / self._n - mx * mx
        if var <= (0.25 * mx) ** 2:
            return None
        per_token = (self._xy / self._n - mx * my) / var
        if per_token <= 0:
            return None
        return max(0.0, my - per_token * mx), per_token

    def tokens_within(self, seconds: float) -> int | None:
        """Padded tokens a batch may hold to run in `seconds`; None where no such cut pays
        (unknown costs, or a fixed cost over a fifth of `seconds`)."""
        fitted = self.fit()
        if fitted is None or fitted[0] > seconds / 5:
            return None
        fixed, per_token = fitted
        return int((seconds - fixed) / per_token)


def _width(batch: list[tuple[Ticket, int]]) -> int:
    return max(len(t.seqs[i]) for t, i in batch)
