"""One consumer that groups queued requests into model batches by a token budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeEmbedError, OverloadedError

__all__ = ["TokenBudgetBatcher", "WorkerDiedError", "BatchResult"]

log = logging.getLogger(__name__)


class WorkerDiedError(EdgeEmbedError):
    """The model worker failed in a way it cannot recover from; the server stops serving."""

    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class BatchResult:
    vectors: np.ndarray  # raw pooled vectors of this request, in input order
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Pending:
    seqs: list[np.ndarray]
    future: asyncio.Future
    enqueued: float
    deadline: float | None
    width: int = field(init=False)

    def __post_init__(self) -> None:
        self.width = max(len(s) for s in self.seqs)

    def cost(self, width: int) -> int:
        return len(self.seqs) * width


class TokenBudgetBatcher:
    """A bounded queue of requests and one consumer task that batches them.

    The consumer takes the oldest request, then keeps adding queued requests until the
    padded-token budget or the batch-size cap is reached or `max_wait_s` has passed since
    that oldest request arrived. Requests whose caller went away or whose deadline passed
    are dropped before compute. Model work runs in a single-thread executor, never on
    the event loop. An EdgeEmbedError from the model fails only its batch; anything else
    means the worker is broken: every pending request fails and `on_death` is called.
    """

    def __init__(
        self,
        run_batch: Callable[[list[np.ndarray]], np.ndarray],
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_death: Callable[[BaseException], None] | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_death = on_death
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-embed-model")
        self.dead: BaseException | None = None
        self._inflight: list[_Pending] = []

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return (self._queue.qsize() if self._queue else 0) + (1 if self._carry else 0)

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="edge-embed-batcher")

    async def submit(self, seqs: list[np.ndarray], deadline: float | None = None) -> BatchResult:
        """Queue one request's token ids; resolve to its raw pooled vectors."""
        if self.dead is not None:
            raise WorkerDiedError(f"the model worker has stopped: {self.dead}")
        if self._queue is None:
            raise WorkerDiedError("the batcher is not running")
        loop = asyncio.get_running_loop()
        item = _Pending(seqs, loop.create_future(), time.monotonic(), deadline)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            hint = self.retry_after_ms()
            error = OverloadedError(f"the request queue is full ({self.max_queue} waiting); retry after {hint} ms")
            error.retry_after_ms = hint
            raise error from None
        return await item.future

    def retry_after_ms(self) -> int:
        """A hint for rejected callers: roughly how long the queue takes to drain."""
        return int(max(10, 1000 * self.max_wait_s + 5 * self.depth))

    async def stop(self) -> None:
        """Finish what is queued, then stop the consumer and the executor."""
        if self._task is not None and self.dead is None:
            while self.depth or self._inflight:
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def _take_nowait(self) -> _Pending | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _next(self, timeout: float | None) -> _Pending | None:
        item = self._take_nowait()
        if item is not None or timeout is not None and timeout <= 0:
            return item
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    @staticmethod
    def _alive(item: _Pending, now: float) -> bool:
        if item.future.done():  # cancelled by the caller going away
            return False
        if item.deadline is not None and now >= item.deadline:
            item.future.cancel()
            return False
        return True

    async def _collect(self) -> list[_Pending]:
        first = await self._next(None)
        while not self._alive(first, time.monotonic()):
            first = await self._next(None)
        batch, width = [first], first.width
        closes = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch_size:
            item = await self._next(closes - time.monotonic())
            if item is None:
                break
            if not self._alive(item, time.monotonic()):
                continue
            new_width = max(width, item.width)
            rows = sum(len(p.seqs) for p in batch) + len(item.seqs)
            if rows * new_width > self.max_batch_tokens or rows > self.max_batch_size:
                self._carry = item
                break
            batch.append(item)
            width = new_width
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._collect()
                self._inflight = batch
                started = time.monotonic()
                seqs = [s for item in batch for s in item.seqs]
                try:
                    vectors = await loop.run_in_executor(self._executor, self._run_batch, seqs)
                except EdgeEmbedError as exc:
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    self._inflight = []
                    continue
                inference_s = time.monotonic() - started
                if self._on_batch:
                    self._on_batch(len(seqs), len(seqs) * max(len(s) for s in seqs), inference_s)
                offset = 0
                for item in batch:
                    n = len(item.seqs)
                    if not item.future.done():
                        item.future.set_result(
                            BatchResult(vectors[offset : offset + n], started - item.enqueued, inference_s, len(seqs))
                        )
                    offset += n
                self._inflight = []
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any other failure means the worker is gone
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.error("model worker died: %r", exc)
        self.dead = exc
        error = WorkerDiedError(f"the model worker has stopped: {exc!r}")
        pending, self._inflight = list(self._inflight), []
        if self._carry is not None:
            pending.append(self._carry)
            self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)
        if self._on_death:
            self._on_death(exc)
