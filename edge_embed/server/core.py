"""The transport-neutral core of the server: request checks, memory and concurrency
admission, the model pool and its batchers, and results before a transport shapes them.

gRPC (grpc_transport.py) and HTTP (http.py) are peer adapters over this module: each
authenticates, translates its wire format to these calls and the answers back, and nothing
else. Nothing here knows a wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import EdgeEmbedError, InvalidInputError, OverloadedError
from ..images import MAX_IMAGE_BYTES, Image
from ..manifest import Manifest
from ..memory import release_free_memory
from ..parity import maxsim
from ..provider import ModelRunner, RerankResult, check_top_n, ranked, wrong_task
from .batcher import REQUEST_ID, Ticket, TokenBudgetBatcher
from .config import ServerConfig
from .metrics import ServerMetrics
from .pool import ModelPool, PooledModel

log = logging.getLogger("edge_embed.server")

__all__ = ["EmbeddingService", "EmbedInput", "Embedded", "Reranked", "Tokenized", "ModelFacts", "RequestMemory", "Reservation", "Arrival",
           "new_request_id", "public_message", "bearer_matches", "REQUEST_ID"]

T = TypeVar("T")
# One input as the transports hand it over: a text, an image, or an ordered mix of both.
EmbedInput = str | Image | list[str | Image]

# Texts up to this many characters in all are tokenized on the event loop (tens of
# microseconds); bigger requests go to the worker thread, one at a time.
_INLINE_CHARS = 4096
# Responses with more values than this are built on the worker thread: 256 x 1024 floats
# took 41 ms to copy into a protobuf and 141 ms to write as JSON, on the event loop.
_INLINE_VALUES = 16_384
# A request's bytes live several times while it is handled: gRPC's buffers, the parsed
# message, its Python strings, the tokenizer's input (measured: about 6 for big requests).
_REQUEST_COPIES = 6
_REQUEST_OVERHEAD_BYTES = 64 * 1024
# Tokens a reranker's prompt template adds to each pair at most (Qwen3-Reranker's: about 60).
_TEMPLATE_TOKENS = 256
_MEMORY_RETRY_MS = 200
# A call whose message has not arrived in this long stops counting as arriving.
_ARRIVAL_TTL_S = 60.0
# A message being received lives in the transport's frames, then its assembled buffer, then
# Python bytes (measured: about 1.5 times its size on average over a flood).
_ARRIVAL_COPIES = 1.5
# Received message bytes after which the freed heap is handed back once nothing is arriving.
_TRIM_AFTER_BYTES = 64 * 1024 * 1024
_BUSY_RETRY_MS = 200


def new_request_id() -> str:
    return secrets.token_hex(6)


def bearer_matches(given: bytes, token: bytes) -> bool:
    """Whether an Authorization value is `Bearer <token>`: the scheme is case-insensitive
    (RFC 7235), the token compared in constant time (no timing oracle on it)."""
    scheme, _, credentials = given.strip().partition(b" ")
    return hmac.compare_digest(scheme.lower(), b"bearer") & hmac.compare_digest(credentials.strip(), token)


def public_message(exc: BaseException) -> str:
    """What a client is told: our own errors' messages; for anything else (a bug) a stable
    line with the request id, while the log gets the detail under the same id."""
    if isinstance(exc, EdgeEmbedError):
        return str(exc)
    rid = REQUEST_ID.get()
    log.error("request %s failed", rid, exc_info=exc)
    return f"internal error (request {rid}); the server log has the detail"


class Reservation:
    """Request memory held by one request: grows as its bytes arrive, released once."""

    def __init__(self, memory: RequestMemory):
        self._memory = memory
        self.nbytes = 0

    def grow(self, wire_bytes: int) -> None:
        """Charge `wire_bytes` more of the request (each lives several times while it is
        handled); OverloadedError when the budget has no room for them now."""
        self._memory.take(self, _REQUEST_COPIES * wire_bytes + (0 if self.nbytes else _REQUEST_OVERHEAD_BYTES))

    def release(self) -> None:
        self._memory.give_back(self)


class Arrival:
    """A call whose message the transport is still receiving: it may hold up to the
    message limit in the transport's buffers before any request memory is reserved."""

    def __init__(self, memory: RequestMemory):
        self._memory = memory
        self.since = time.monotonic()

    def done(self, nbytes: int = 0) -> None:
        """Its `nbytes` are in (or it ended): idempotent."""
        self._memory.arrived(self, nbytes)


class RequestMemory:
    """Admission by memory: the bytes of requests being handled stay within what the
    memory budget leaves beside the process and its resident models.

    Calls still arriving count too: gRPC receives every open call's message side by side
    before any is parsed (a flood of big messages holds hundreds of MB in the transport),
    so each arriving call is charged `arrival_bytes` (a message at the limit, as the
    transport holds it), a call is refused at the door without its message being read
    once arrivals and requests fill what is left, and a request being parsed must fit
    beside the arrivals. An arrival that never completes (a client gone mid-message)
    stops counting after `_ARRIVAL_TTL_S`. With nothing held the first request is always
    let in, so nothing can lock the server out."""

    def __init__(self, available: Callable[[], int], arrival_bytes: int = 0):
        self._available = available
        self._arrival_bytes = arrival_bytes
        self._arriving: dict[Arrival, None] = {}
        self._received = 0  # bytes of messages received since the freed heap was last handed back
        self.held = 0

    def arrived(self, arrival: Arrival, nbytes: int) -> None:
        """`arrival` ended with `nbytes` received (a second call for it counts nothing). After
        a burst of big messages, once none is arriving, the freed heap goes back to the OS:
        glibc keeps it in the receiving threads' arenas, where it would stay resident beside
        the inference that follows."""
        if arrival not in self._arriving:
            return
        del self._arriving[arrival]
        self._received += nbytes
        if not self._arriving and self._received > _TRIM_AFTER_BYTES:
            self._received = 0
            release_free_memory()

    def arrival(self) -> Arrival:
        """Count a call whose message is on its way (end it with `done()`)."""
        arrival = Arrival(self)
        self._arriving[arrival] = None
        return arrival

    def arriving_bytes(self) -> int:
        """What the calls still arriving may hold in the transport, at most."""
        stale = time.monotonic() - _ARRIVAL_TTL_S
        while self._arriving and (oldest := next(iter(self._arriving))).since < stale:
            oldest.done()
        return len(self._arriving) * self._arrival_bytes

    def door_refusal(self) -> OverloadedError | None:
        """Why a new call is refused before its message is read (None: let it arrive): the
        requests being handled and the calls still arriving already fill the request
        memory left. A call is never refused for what it might bring, so small calls keep
        coming in while memory is tight."""
        arriving = self.arriving_bytes()
        if self.held + arriving <= self._available():
            return None
        return OverloadedError(
            f"requests being handled hold {self.held / 1e6:,.0f} MB and {len(self._arriving)} calls still "
            f"arriving may hold {arriving / 1e6:,.0f} MB: the memory budget has no room for more; retry "
            f"after {_MEMORY_RETRY_MS} ms", retry_after_ms=_MEMORY_RETRY_MS, cause="memory")

    def reserve(self, wire_bytes: int) -> Reservation:
        """A reservation for a request of `wire_bytes`, or OverloadedError (retry)."""
        reservation = Reservation(self)
        reservation.grow(wire_bytes)
        return reservation

    def take(self, reservation: Reservation, nbytes: int) -> None:
        arriving = self.arriving_bytes() if self.held else 0
        if self.held and self.held + arriving + nbytes > self._available():
            also = f" ({len(self._arriving)} calls still arriving may hold {arriving / 1e6:,.0f} MB)" if arriving else ""
            raise OverloadedError(
                f"requests being handled hold {self.held / 1e6:,.0f} MB{also} and "
                f"this one needs {nbytes / 1e6:,.1f} MB more than the memory budget leaves: retry after "
                f"{_MEMORY_RETRY_MS} ms", retry_after_ms=_MEMORY_RETRY_MS, cause="memory")
        self.held += nbytes
        reservation.nbytes += nbytes

    def give_back(self, reservation: Reservation) -> None:
        self.held -= reservation.nbytes
        reservation.nbytes = 0


@dataclass(frozen=True)
class Embedded:
    """One request's vectors and facts, before a transport shapes the answer: a [n, dim]
    array, or for a multi-vector model an object array of n [tokens, dim] matrices."""

    vectors: np.ndarray
    token_counts: list[int]
    model: str
    dimensions: int
    queue_s: float
    inference_s: float
    # A multi-vector answer's memory, charged to the request budget until the transport has
    # sent it: `release()` once the response is built.
    answer: Reservation | None = None

    def release(self) -> None:
        if self.answer is not None:
            self.answer.release()


@dataclass(frozen=True)
class Reranked:
    """One rerank request's results (best first) and facts, before a transport shapes them."""

    results: list[RerankResult]
    token_counts: list[int]
    model: str
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class Tokenized:
    seqs: list[np.ndarray]
    model: str


@dataclass(frozen=True)
class ModelFacts:
    """What Info says of one model: from its last load, else from its manifest alone."""

    name: str
    task: str
    dim: int
    min_dim: int
    max_length: int
    instruction_aware: bool
    default_instruction: str
    precision: str = ""
    backend: str = ""
    execution_providers: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("text",)


class EmbeddingService:
    """Checks every request, admits it by concurrency, memory and tokens, and hands token
    ids to its model's batcher; one instance serves every transport."""

    def __init__(self, pool: ModelPool, config: ServerConfig, metrics: ServerMetrics):
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.memory = RequestMemory(lambda: pool.budget_bytes - pool.committed_bytes,
                                    arrival_bytes=int(_ARRIVAL_COPIES * config.max_message_bytes))
        self.inflight = 0  # model requests being handled, over both transports
        self._precounting: object | None = None  # the request tokenized to learn its real size
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-embed-requests")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- admission at the door ----------------------------------------------------------

    def busy(self) -> bool:
        """Whether a new model request would pass `max_concurrent_rpcs` now."""
        return self.inflight >= self.config.max_concurrent_rpcs

    def busy_error(self) -> OverloadedError:
        return OverloadedError(
            f"{self.inflight} requests are being handled; the limit is {self.config.max_concurrent_rpcs}: "
            f"retry after {_BUSY_RETRY_MS} ms", retry_after_ms=_BUSY_RETRY_MS, cause="concurrency")

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """One of `max_concurrent_rpcs` model requests (health, Info and reflection take none)."""
        if self.busy():
            raise self.busy_error()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def refused(self, exc: BaseException) -> None:
        """Count a refusal for load by its cause."""
        if isinstance(exc, OverloadedError):
            self.metrics.refusals.labels(exc.cause).inc()

    # -- request checks ---------------------------------------------------------------

    def _check_count(self, count: int, field: str) -> None:
        if count == 0:
            raise InvalidInputError(f"{field} is empty: send at least one text")
        if count > self.config.max_inputs:
            raise InvalidInputError(f"{field} has {count} texts; the limit is {self.config.max_inputs}")

    def _check_inputs(self, inputs: list[EmbedInput], field: str = "inputs") -> None:
        self._check_count(len(inputs), field)
        for i, item in enumerate(inputs):
            for j, part in enumerate(item) if isinstance(item, list) else [(None, item)]:
                if isinstance(part, str) and len(part) > self.config.max_text_chars:
                    name = f"{field}[{i}]" if j is None else f"{field}[{i}].parts[{j}]"
                    raise InvalidInputError(
                        f"{name} has {len(part)} characters; the limit is {self.config.max_text_chars}"
                    )

    def open_image(self, data: bytes, field: str) -> Image:
        """An image's bytes from a request, its header checked against the server's limits
        (nothing decoded yet)."""
        return Image.open(data, field=field, max_pixels=self.config.max_image_pixels,
                          max_bytes=min(MAX_IMAGE_BYTES, self.config.max_message_bytes))

    @staticmethod
    def _size(inputs: list[EmbedInput]) -> int:
        """Characters and image bytes: what decides whether the work leaves the event loop."""
        parts = (p for item in inputs for p in (item if isinstance(item, list) else [item]))
        return sum(len(p) if isinstance(p, str) else len(p.data) for p in parts)

    @staticmethod
    def _task(model: PooledModel) -> str:
        return model.info.task if model.info is not None else model.source_manifest().task

    @classmethod
    def _check_task(cls, model: PooledModel, wanted: str) -> None:
        """A request for the other task is refused before any work, naming both kinds."""
        task = cls._task(model)
        if task != wanted:
            raise wrong_task(model.name, task, wanted)

    def _check_instruction(self, instruction: str) -> None:
        if len(instruction) > self.config.max_instruction_chars:
            raise InvalidInputError(f"instruction has {len(instruction)} characters; the limit is "
                                    f"{self.config.max_instruction_chars}")

    async def off_loop(self, size: int, limit: int, work: Callable[[], T]) -> T:
        """Run small work on the event loop and big work (over `limit`) on the worker
        thread, so neither transport stalls while a big request is tokenized or answered."""
        if size <= limit:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    async def shape(self, values: int, build: Callable[[], T]) -> T:
        """Build a response of `values` numbers off the event loop when it is big."""
        return await self.off_loop(values, _INLINE_VALUES, build)

    async def _admitted(self, batcher: TokenBudgetBatcher, bound: int, deadline: float | None,
                        materialize: Callable[[], tuple[int, Callable[[], list[np.ndarray]]]]
                        ) -> tuple[list[np.ndarray], Any]:
        """Tokenize a request and submit it under admission by tokens.

        `bound` (from the request's size on the wire) is tried first, before the inputs
        become Python strings. When it does not fit the queue now, one request at a time
        may be tokenized to learn its real count, which then waits for room (a bounded
        wait): a request whose real size fits gets in under steady small traffic instead
        of only into an empty queue. Others meanwhile are refused at once with a hint, so a
        flood never makes strings of, or tokenizes, what it will refuse.

        `materialize()` checks the inputs and returns (characters, tokenize).
        """
        with contextlib.ExitStack() as stack:
            ticket: Ticket | None = batcher.try_admit(bound, deadline)
            if ticket is not None:
                stack.enter_context(ticket)
            elif self._precounting is not None:
                raise batcher.full_error(bound)
            else:
                self._precounting = owner = object()
                stack.callback(self._end_precount, owner)
            chars, tokenize = materialize()
            seqs = await self.off_loop(chars, _INLINE_CHARS, tokenize)
            if ticket is None:
                ticket = stack.enter_context(await batcher.admit_when_room(sum(len(s) for s in seqs), deadline))
                self._end_precount(owner)
            return seqs, await ticket.submit(seqs)

    def _end_precount(self, owner: object) -> None:
        if self._precounting is owner:
            self._precounting = None

    # -- the request paths --------------------------------------------------------------

    async def embed_texts(self, model_name: str, count: int, nbytes: int, texts: Callable[[], list[EmbedInput]],
                          *, instruction: str = "", dimensions: int | None = None, normalize: bool = True,
                          truncate: bool = True, deadline: float | None = None, field: str = "inputs",
                          images: int = 0, input_type: str | None = None,
                          answer_bytes_per_value: float = 8.0) -> Embedded:
        """The one embedding path of every transport: checks, admission by tokens, the model's
        batcher, then the Matryoshka cut and normalization.

        `count`, `nbytes` (the request's size on the wire) and `images` (how many of its
        inputs or parts are images) bound the tokens before `texts()` makes Python strings
        and Images of the inputs: a text token takes at least one byte of UTF-8, an image
        costs the model's visual tokens whatever its bytes, and no text passes the model's
        limit. Images are decoded with the tokenizing, off the event loop, one at a time.
        `field` is what errors call the inputs. A multi-vector model answers one matrix of
        token vectors per input (`Embedded.vectors` then holds them as an object array),
        reading the inputs as queries or documents (`input_type`, default document). Its
        answer (tokens x dim values, `answer_bytes_per_value` each as the transport writes
        them, the vectors included) is charged to the request memory before it is built, and
        refused with RESOURCE_EXHAUSTED when the budget has no room: a page is a thousand
        vectors, so its answer is hundreds of times its request's tokens.
        """
        start = time.monotonic()
        multi = self._task(self.pool.find(model_name)) == "multivector"
        if multi:
            if instruction:
                raise InvalidInputError(f"{model_name or 'the model'} is a multi-vector model and takes no instruction; "
                                        "send input_type query or document")
            if dimensions or not normalize:
                raise InvalidInputError("a multi-vector model's token vectors have one width and unit length: "
                                        "send neither dimensions nor normalize=false")
        else:
            self._check_task(self.pool.find(model_name), "embed")
            if input_type is not None:
                raise InvalidInputError("input_type is for multi-vector models (query or document); this model "
                                        "reads queries through its instruction")
        if input_type not in (None, "query", "document"):
            raise InvalidInputError(f"input_type must be query or document, got {str(input_type)[:40]!r}")
        self._check_count(count, field)
        self._check_instruction(instruction)
        async with self.pool.use(model_name, deadline) as model:
            runner, batcher, info = model.runner, model.batcher, model.info
            try:
                width = info.check_dimensions(dimensions or None)
            except InvalidInputError as exc:
                raise InvalidInputError(f"dimensions: {exc}") from None
            if images and not info.image_tokens:
                raise InvalidInputError(f"{field} holds images, and {model.name} ({info.precision} on {info.backend}) "
                                        "reads text only")
            per_image = info.image_tokens or 0
            bound = min(count * max(info.max_length, per_image),
                        nbytes + count * (len(instruction) + 8) + images * per_image)

            def materialize() -> tuple[int, Callable[[], list[np.ndarray]]]:
                inputs = texts()
                self._check_inputs(inputs, field)
                if multi:
                    return self._size(inputs), lambda: runner.tokenize_multi(
                        inputs, kind=input_type or "document", truncate=truncate, field=field)
                return self._size(inputs), lambda: runner.tokenize(
                    inputs, instruction=instruction or None, truncate=truncate, field=field)

            seqs, result = await self._admitted(batcher, bound, deadline, materialize)
            vectors = result.vectors if multi else runner.finish(result.vectors, width, normalize, field=field)
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.total_seconds.observe(time.monotonic() - start)
        answer = None
        if multi:
            answer = Reservation(self.memory)
            self.memory.take(answer, int(sum(m.size for m in vectors) * answer_bytes_per_value))
        return Embedded(vectors, [len(s) for s in seqs], model.name, width, result.queue_s, result.inference_s,
                        answer)

    async def rerank_documents(self, model_name: str, query: EmbedInput, count: int, nbytes: int,
                               documents: Callable[[], list[EmbedInput]], *, instruction: str = "",
                               top_n: int | None = None, return_documents: bool = False,
                               deadline: float | None = None, field: str = "documents",
                               images: int = 0) -> Reranked:
        """The one rerank path of every transport: the same checks, admission by tokens and
        batcher as embedding (pairs share batches with each other), then scores, best first.

        Every pair repeats the query and the template, so the token bound counts them per
        pair (a query's images too); `images` is how many images the documents hold. A query
        or document is a text, or, for a reranker that reads images, an image or a mix.
        """
        start = time.monotonic()
        multi = self._task(self.pool.find(model_name)) == "multivector"
        if not multi:
            self._check_task(self.pool.find(model_name), "rerank")
        elif instruction:
            raise InvalidInputError(f"{model_name or 'the model'} is a multi-vector model and takes no instruction")
        self._check_count(count, field)
        self._check_instruction(instruction)
        check_top_n(top_n)
        query_parts = query if isinstance(query, list) else [query]
        for j, part in enumerate(query_parts):
            if isinstance(part, str) and len(part) > self.config.max_text_chars:
                name = "query" if len(query_parts) == 1 else f"query.parts[{j}]"
                raise InvalidInputError(f"{name} has {len(part)} characters; the limit is {self.config.max_text_chars}")
        query_images = sum(1 for p in query_parts if isinstance(p, Image))
        query_chars = sum(len(p) if isinstance(p, str) else len(p.data) for p in query_parts)
        async with self.pool.use(model_name, deadline) as model:
            runner, batcher, info = model.runner, model.batcher, model.info
            if (images or query_images) and not info.image_tokens:
                raise InvalidInputError(f"{'query' if query_images else field} holds images, and {model.name} "
                                        f"({info.precision} on {info.backend}) reads text only")
            per_image = info.image_tokens or 0
            per_pair = (sum(len(p.encode()) for p in query_parts if isinstance(p, str)) + query_images * per_image
                        + len(instruction.encode()) + _TEMPLATE_TOKENS)
            bound = min(count * info.max_length, nbytes + count * per_pair + images * per_image)
            docs: list[EmbedInput] = []

            def materialize() -> tuple[int, Callable[[], list[np.ndarray]]]:
                docs.extend(documents())
                self._check_inputs(docs, field)
                if multi:  # the query's token vectors and each document's, scored here by MaxSim
                    return query_chars + self._size(docs), lambda: [
                        *runner.tokenize_multi([query], kind="query", field="query"),
                        *runner.tokenize_multi(docs, field=field)]
                return query_chars * len(docs) + self._size(docs), lambda: runner.tokenize_pairs(
                    query, docs, instruction=instruction or None, field=field)

            seqs, result = await self._admitted(batcher, bound, deadline, materialize)
            if multi:
                scores = maxsim(result.vectors[0], list(result.vectors[1:]))
                seqs = seqs[1:]  # token counts are the documents'
            else:
                scores = runner.finish_scores(result.vectors, field=field)
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.total_seconds.observe(time.monotonic() - start)
        return Reranked(ranked(scores, docs, top_n, return_documents), [len(s) for s in seqs], model.name,
                        result.queue_s, result.inference_s)

    async def tokenize_texts(self, model_name: str, inputs: list[str], *, instruction: str = "",
                             deadline: float | None = None) -> Tokenized:
        """Token ids as the model would read them (template and EOS included)."""
        self._check_task(self.pool.find(model_name), "embed")
        self._check_inputs(inputs)
        self._check_instruction(instruction)
        async with self.pool.use(model_name, deadline) as model:
            runner: ModelRunner = model.runner
            seqs = await self.off_loop(sum(len(t) for t in inputs), _INLINE_CHARS, lambda: runner.tokenize(
                inputs, instruction=instruction or None, truncate=True, field="inputs"))
        return Tokenized(seqs, model.name)

    def facts(self, model_name: str) -> ModelFacts:
        """The named (or default) model's facts; a model never loaded is described from
        its manifest alone (Info never loads one)."""
        model = self.pool.find(model_name)
        if model.info is not None:
            i = model.info
            return ModelFacts(model.name, i.task, i.dim, i.matryoshka_min_dim or i.dim, i.max_length,
                              i.instruction_aware, i.default_instruction or "", i.precision, i.backend,
                              tuple(i.execution_providers), tuple(i.modalities))
        m: Manifest = model.source_manifest()
        if m.rerank is not None:
            aware, default = m.rerank.takes_instruction, m.rerank.default_instruction
        else:
            aware, default = m.instruction_template is not None or m.vl is not None, m.default_instruction
        return ModelFacts(model.name, m.task, m.dim, m.matryoshka_min_dim or m.dim, m.max_length, aware,
                          default or "", modalities=tuple(m.modalities))
