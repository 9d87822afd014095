"""The edge_embed.v1 EmbeddingService: request checks, batching, and the one error mapping."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from .. import __version__
from ..errors import (
    EdgeEmbedError,
    InvalidInputError,
    OverloadedError,
    RequestTooLargeError,
    UnauthenticatedError,
    grpc_code_of,
    retry_after_ms_of,
)
from ..memory import rss_bytes
from ..provider import ModelRunner, RerankResult, ranked, wrong_task
from ..v1 import embed_pb2 as pb
from .config import ServerConfig
from .metrics import ServerMetrics
from .pool import ModelPool, ModelStatus

log = logging.getLogger(__name__)

__all__ = ["EmbeddingService", "Embedded", "Reranked", "grpc_status", "SERVICE_NAME", "method_handlers", "BearerTokenInterceptor",
           "RequestMemory"]

SERVICE_NAME = "edge_embed.v1.EmbeddingService"
_STREAM_WINDOW = 64  # stream messages in flight at once; beyond this the reader waits
# Texts up to this many characters in all are tokenized on the event loop (tens of
# microseconds); bigger requests go to the tokenizer thread, one at a time.
_INLINE_TOKENIZE_CHARS = 4096
# A request's bytes live several times while it is handled: gRPC's buffers, the parsed
# message, its Python strings, the tokenizer's input (measured: about 6 for big requests).
_REQUEST_COPIES = 6
_REQUEST_OVERHEAD_BYTES = 64 * 1024
# Tokens a reranker's prompt template adds to each pair at most (Qwen3-Reranker's: about 60).
_TEMPLATE_TOKENS = 256


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The one place errors become gRPC status codes: each error class names its own."""
    return getattr(grpc.StatusCode, grpc_code_of(exc))


class RequestMemory:
    """Admission by memory: the bytes of requests being handled stay within what the
    memory budget leaves beside the process and its resident models."""

    def __init__(self, available: Callable[[], int]):
        self._available = available
        self.held = 0

    def try_reserve(self, nbytes: int) -> bool:
        if self.held and self.held + nbytes > self._available():
            return False
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= nbytes

    def reserve(self, wire_bytes: int) -> int:
        """Reserve what a request of `wire_bytes` holds while handled; returns the charge to
        release, or raises OverloadedError (retry) when the budget has no room for it now."""
        cost = _REQUEST_COPIES * wire_bytes + _REQUEST_OVERHEAD_BYTES
        if not self.try_reserve(cost):
            raise OverloadedError(
                f"requests being handled hold {self.held / 1e6:,.0f} MB and this one needs {cost / 1e6:,.1f} MB "
                "more than the memory budget leaves: retry after 200 ms", retry_after_ms=200)
        return cost


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can say why."""

    def __init__(self, error: EdgeEmbedError):
        self.error = error


@dataclass(frozen=True)
class Embedded:
    """One request's vectors and facts, before a transport shapes the answer."""

    vectors: np.ndarray
    token_counts: list[int]
    model: str
    dimensions: int
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class Reranked:
    """One rerank request's results (best first) and facts, before a transport shapes them."""

    results: list[RerankResult]
    token_counts: list[int]
    model: str
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class _Admitted:
    """A parsed request and the memory it holds until it is answered."""

    message: Any
    nbytes: int


def _parser(message_type: type, max_bytes: int, memory: RequestMemory) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Malformed(RequestTooLargeError(f"the request is {len(data)} bytes; the limit is {max_bytes}"))
        try:
            cost = memory.reserve(len(data))
        except OverloadedError as exc:
            return _Malformed(exc)
        try:
            return _Admitted(message_type.FromString(data), cost)
        except DecodeError as exc:
            memory.release(cost)
            return _Malformed(InvalidInputError(
                f"the request does not parse (invalid UTF-8 in a string field?): {exc}"))

    return parse


class EmbeddingService:
    """Checks every request field, admits it by tokens, and hands token ids to its model's batcher."""

    def __init__(self, pool: ModelPool, config: ServerConfig, metrics: ServerMetrics):
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.memory = RequestMemory(lambda: pool.budget_bytes - pool.committed_bytes)
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-embed-tokenize")

    def close(self) -> None:
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # -- request checks ---------------------------------------------------------------

    def _check_count(self, count: int, field: str) -> None:
        if count == 0:
            raise InvalidInputError(f"{field} is empty: send at least one text")
        if count > self.config.max_inputs:
            raise InvalidInputError(f"{field} has {count} texts; the limit is {self.config.max_inputs}")

    def _check_inputs(self, inputs: list[str], field: str = "inputs") -> None:
        self._check_count(len(inputs), field)
        for i, text in enumerate(inputs):
            if len(text) > self.config.max_text_chars:
                raise InvalidInputError(
                    f"{field}[{i}] has {len(text)} characters; the limit is {self.config.max_text_chars}"
                )

    @staticmethod
    def _check_task(model: Any, wanted: str) -> None:
        """A request for the other task is refused before any work, naming both kinds."""
        task = model.info.task if model.info is not None else model.source_manifest().task
        if task != wanted:
            raise wrong_task(model.name, task, wanted)

    def _check_instruction(self, instruction: str) -> None:
        if len(instruction) > self.config.max_instruction_chars:
            raise InvalidInputError(f"instruction has {len(instruction)} characters; the limit is "
                                    f"{self.config.max_instruction_chars}")

    async def _tokenize(self, runner: ModelRunner, inputs: list[str], instruction: str, truncate: bool,
                        field: str = "inputs") -> list:
        return await self._off_loop(sum(len(t) for t in inputs), lambda: runner.tokenize(
            inputs, instruction=instruction or None, truncate=truncate, field=field))

    async def _off_loop(self, chars: int, run: Callable[[], list]) -> list:
        """Tokenize small requests on the event loop, big ones on the tokenizer thread."""
        if chars <= _INLINE_TOKENIZE_CHARS:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, run)

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext | None) -> float | None:
        remaining = context.time_remaining() if context is not None else None
        return None if remaining is None else time.monotonic() + remaining

    # -- RPC bodies -------------------------------------------------------------------

    async def embed_texts(self, model_name: str, count: int, nbytes: int, texts: Callable[[], list[str]], *,
                          instruction: str = "", dimensions: int | None = None, normalize: bool = True,
                          truncate: bool = True, deadline: float | None = None, field: str = "inputs") -> Embedded:
        """The one embedding path of every transport: checks, admission by tokens, the model's
        batcher, then the Matryoshka cut and normalization.

        `count` and `nbytes` (the request's size on the wire) bound the tokens before
        `texts()` makes Python strings of the inputs: a token takes at least one byte of
        UTF-8, and no text passes the model's limit. `field` is what errors call the texts.
        """
        start = time.monotonic()
        self._check_task(self.pool.find(model_name), "embed")
        self._check_count(count, field)
        self._check_instruction(instruction)
        async with self.pool.use(model_name, deadline) as model:
            runner, batcher, info = model.runner, model.batcher, model.info
            try:
                width = info.check_dimensions(dimensions or None)
            except InvalidInputError as exc:
                raise InvalidInputError(f"dimensions: {exc}") from None
            bound = min(count * info.max_length, nbytes + count * (len(instruction) + 8))
            with batcher.admit(bound, deadline) as ticket:
                inputs = texts()
                self._check_inputs(inputs, field)
                seqs = await self._tokenize(runner, inputs, instruction, truncate, field)
                del inputs
                self.metrics.queue_depth.set(batcher.depth)
                result = await ticket.submit(seqs)
            vectors = runner.finish(result.vectors, width, normalize, field=field)
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.total_seconds.observe(time.monotonic() - start)
        return Embedded(vectors, [len(s) for s in seqs], model.name, width, result.queue_s, result.inference_s)

    async def rerank_documents(self, model_name: str, query: str, count: int, nbytes: int,
                               documents: Callable[[], list[str]], *, instruction: str = "",
                               top_n: int | None = None, return_documents: bool = False,
                               deadline: float | None = None, field: str = "documents") -> Reranked:
        """The one rerank path of every transport: the same checks, admission by tokens and
        batcher as embedding (pairs share batches with each other), then scores, best first.

        Every pair repeats the query and the template, so the token bound counts them per pair.
        """
        start = time.monotonic()
        self._check_task(self.pool.find(model_name), "rerank")
        self._check_count(count, field)
        self._check_instruction(instruction)
        if len(query) > self.config.max_text_chars:
            raise InvalidInputError(f"query has {len(query)} characters; the limit is {self.config.max_text_chars}")
        if top_n is not None and top_n < 1:
            raise InvalidInputError(f"top_n must be a positive integer, got {top_n}")
        async with self.pool.use(model_name, deadline) as model:
            runner, batcher, info = model.runner, model.batcher, model.info
            per_pair = len(query.encode()) + len(instruction.encode()) + _TEMPLATE_TOKENS
            bound = min(count * info.max_length, nbytes + count * per_pair)
            with batcher.admit(bound, deadline) as ticket:
                docs = documents()
                self._check_inputs(docs, field)
                seqs = await self._off_loop(len(query) * len(docs) + sum(len(d) for d in docs), lambda: (
                    runner.tokenize_pairs(query, docs, instruction=instruction or None, field=field)))
                self.metrics.queue_depth.set(batcher.depth)
                result = await ticket.submit(seqs)
            scores = runner.finish_scores(result.vectors, field=field)
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.total_seconds.observe(time.monotonic() - start)
        return Reranked(ranked(scores, docs, top_n, return_documents), [len(s) for s in seqs], model.name,
                        result.queue_s, result.inference_s)

    async def rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        done = await self.rerank_documents(
            request.model, request.query, len(request.documents), request.ByteSize(), lambda: list(request.documents),
            instruction=request.instruction, top_n=request.top_n or None,
            return_documents=request.return_documents, deadline=self._deadline(context))
        return pb.RerankResponse(
            results=[pb.RerankResult(index=r.index, score=r.score, document=r.document or "") for r in done.results],
            token_counts=done.token_counts, model=done.model, queue_ms=done.queue_s * 1000,
            inference_ms=done.inference_s * 1000)

    async def embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        done = await self.embed_texts(
            request.model, len(request.inputs), request.ByteSize(), lambda: list(request.inputs),
            instruction=request.instruction, dimensions=request.dimensions or None,
            normalize=request.normalize if request.HasField("normalize") else True,
            truncate=request.truncate if request.HasField("truncate") else True,
            deadline=self._deadline(context),
        )
        response = pb.EmbedResponse(
            token_counts=done.token_counts,
            model=done.model,
            dimensions=done.dimensions,
            queue_ms=done.queue_s * 1000,
            inference_ms=done.inference_s * 1000,
        )
        add = response.embeddings.add
        for v in done.vectors:
            add().values.extend(v)
        return response

    async def tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._check_task(self.pool.find(request.model), "embed")
        inputs = list(request.inputs)
        self._check_inputs(inputs)
        self._check_instruction(request.instruction)
        async with self.pool.use(request.model, self._deadline(context)) as model:
            seqs = await self._tokenize(model.runner, inputs, request.instruction, True)
        return pb.TokenizeResponse(
            tokens=[pb.TokenIds(ids=s.tolist()) for s in seqs], token_counts=[len(s) for s in seqs]
        )

    async def info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        """The named (or default) model's facts, every model's state and the memory budget;
        a model never loaded is described from its manifest alone."""
        model, c, pool = self.pool.find(request.model), self.config, self.pool
        top: dict[str, Any] = {}
        if model.info is not None:
            info = model.info
            top = dict(precision=info.precision, backend=info.backend,
                       execution_providers=list(info.execution_providers))
        if model.info is not None:
            facts = model.info
            dim, min_dim, max_length = facts.dim, facts.matryoshka_min_dim, facts.max_length
            instruction_aware, default_instruction = facts.instruction_aware, facts.default_instruction
            task = facts.task
        else:
            manifest = model.source_manifest()
            dim, min_dim, max_length = manifest.dim, manifest.matryoshka_min_dim, manifest.max_length
            task = manifest.task
            if manifest.rerank is not None:
                instruction_aware = manifest.rerank.takes_instruction
                default_instruction = manifest.rerank.default_instruction
            else:
                instruction_aware = manifest.instruction_template is not None
                default_instruction = manifest.default_instruction
        return pb.InfoResponse(
            model=model.name,
            dim=dim,
            min_dim=min_dim or dim,
            max_length=max_length,
            instruction_aware=instruction_aware,
            default_instruction=default_instruction or "",
            batching=pb.BatchingLimits(
                max_batch_tokens=c.max_batch_tokens, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                max_queue_tokens=c.queue_tokens, max_inputs_per_request=c.max_inputs,
                max_text_chars=c.max_text_chars, max_concurrent_rpcs=c.max_concurrent_rpcs,
                run_timeout_s=c.run_timeout_s, max_instruction_chars=c.max_instruction_chars,
            ),
            version=__version__,
            models=[_model_status(s) for s in pool.status()],
            task=task,
            memory=pb.MemoryBudget(budget_bytes=pool.budget_bytes, committed_bytes=pool.committed_bytes,
                                   base_bytes=pool.base_bytes, rss_bytes=rss_bytes() or 0,
                                   requests_bytes=self.memory.held),
            **top,
        )

    async def embed_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        """Answers in request order; messages are computed concurrently so they can share batches.

        At most `_STREAM_WINDOW` messages are in flight; when the client goes away, the
        reader and every message still in flight are cancelled.
        """
        window: asyncio.Queue = asyncio.Queue(maxsize=_STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.put(asyncio.ensure_future(self._answer(request, context)))
            except asyncio.CancelledError:
                raise  # the consumer is gone; nobody waits for the end marker
            except Exception:  # noqa: BLE001 - a broken client stream simply ends the stream
                pass
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await window.get()) is not None:
                yield await task
        finally:
            reader.cancel()
            while not window.empty():
                task = window.get_nowait()
                if task is not None:
                    task.cancel()

    async def _answer(self, request: Any, context: grpc.aio.ServicerContext) -> pb.EmbedStreamResponse:
        message = request.message if isinstance(request, _Admitted) else None
        rid = message.request_id if message is not None else ""
        try:
            if isinstance(request, _Malformed):
                raise request.error
            response = await self.embed(message, context)
        except Exception as exc:  # noqa: BLE001 - one message's error is that message's answer
            code = grpc_status(exc)
            if not isinstance(exc, EdgeEmbedError):
                log.exception("EmbedStream message failed")
            self.metrics.requests.labels("EmbedStream.message", code.name).inc()
            text = str(exc) if isinstance(exc, EdgeEmbedError) else f"internal error: {exc!r}"
            return pb.EmbedStreamResponse(request_id=rid, error=pb.StreamError(code=code.name, message=text))
        finally:
            if isinstance(request, _Admitted):
                self.memory.release(request.nbytes)
        self.metrics.requests.labels("EmbedStream.message", "OK").inc()
        return pb.EmbedStreamResponse(request_id=rid, response=response)


def _model_status(s: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=s.name, model_id=s.model_id, state=s.state.value, pinned=s.pinned, precision=s.precision,
        charged_bytes=s.charged_bytes, charged_from=s.charged_from,
        resident_measured_bytes=max(0, s.resident_measured_bytes or 0), loads=s.loads,
        evictions=s.evictions, requests=s.requests, parity_cos_min=s.parity_cos_min or 0.0,
        parity_ok=bool(s.parity_ok), error=s.error or "", task=s.task,
    )


def _retry_metadata(exc: BaseException) -> tuple:
    """The `retry-after-ms` trailer of errors a wait can cure (a full queue, a loading model)."""
    hint = retry_after_ms_of(exc)
    return (("retry-after-ms", str(int(hint))),) if hint is not None else ()


def _unary(service: EmbeddingService, name: str, body: Callable) -> Callable:
    """Wrap an RPC body: count it, and turn any error into its status (never a crash)."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise request.error
            response = await body(request.message, context)
        except asyncio.CancelledError:
            service.metrics.requests.labels(name, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            code = grpc_status(exc)
            service.metrics.requests.labels(name, code.name).inc()
            if not isinstance(exc, EdgeEmbedError):
                log.exception("%s failed", name)
            message = str(exc) if isinstance(exc, EdgeEmbedError) else f"internal error: {exc!r}"
            await context.abort(code, message, trailing_metadata=_retry_metadata(exc))
        finally:
            if isinstance(request, _Admitted):
                service.memory.release(request.nbytes)
        service.metrics.requests.labels(name, "OK").inc()
        return response

    return handler


def method_handlers(service: EmbeddingService, max_message_bytes: int) -> grpc.GenericRpcHandler:
    def parse(message_type: type) -> Callable[[bytes], Any]:
        return _parser(message_type, max_message_bytes, service.memory)

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Embed": grpc.unary_unary_rpc_method_handler(
                _unary(service, "Embed", service.embed), parse(pb.EmbedRequest), pb.EmbedResponse.SerializeToString
            ),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(
                service.embed_stream, parse(pb.EmbedRequest), pb.EmbedStreamResponse.SerializeToString
            ),
            "Rerank": grpc.unary_unary_rpc_method_handler(
                _unary(service, "Rerank", service.rerank), parse(pb.RerankRequest), pb.RerankResponse.SerializeToString
            ),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                _unary(service, "Tokenize", service.tokenize), parse(pb.TokenizeRequest),
                pb.TokenizeResponse.SerializeToString,
            ),
            "Info": grpc.unary_unary_rpc_method_handler(
                _unary(service, "Info", service.info), parse(pb.InfoRequest), pb.InfoResponse.SerializeToString
            ),
        },
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks."""

    _OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if details.method.startswith(self._OPEN_PREFIXES) or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given, self._expected):  # constant time: no timing oracle on the token
            return handler
        error = UnauthenticatedError("missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

        async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc_status(error), str(error))

        async def deny_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            await context.abort(grpc_status(error), str(error))
            yield  # pragma: no cover - makes this an async generator

        kind = (handler.request_streaming, handler.response_streaming)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }.get(kind)
        if make is not None:
            return make(deny, handler.request_deserializer, handler.response_serializer)
        make = grpc.unary_stream_rpc_method_handler if kind == (False, True) else grpc.stream_stream_rpc_method_handler
        return make(deny_stream, handler.request_deserializer, handler.response_serializer)
