"""The edge_embed.v1 gRPC transport: a peer adapter over the core (core.py).

At the door, before a request's bytes are parsed or any memory is reserved: the bearer
token (`BearerTokenInterceptor`), then the model-request concurrency limit (health,
reflection and Info are never refused for load). Then each message is parsed against
the request memory, translated to a core call, and the answer back to protobuf. Errors
become their class's status code here and nowhere else, with trailers a client reads:
`retry-after-ms` and gRPC's own `grpc-retry-pushback-ms` where waiting helps,
`edge-embed-error` (the error class) and `request-id`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from .. import __version__
from ..errors import (
    EdgeEmbedError,
    InvalidInputError,
    RequestTooLargeError,
    UnauthenticatedError,
    grpc_code_of,
    retry_after_ms_of,
)
from ..memory import rss_bytes
from ..v1 import embed_pb2 as pb
from ..images import Image
from .core import (REQUEST_ID, Arrival, EmbeddingService, EmbedInput, Reservation, bearer_matches, new_request_id,
                   public_message)
from .pool import ModelStatus

__all__ = ["SERVICE_NAME", "grpc_status", "method_handlers", "ArrivalInterceptor", "BearerTokenInterceptor",
           "error_trailers"]

SERVICE_NAME = "edge_embed.v1.EmbeddingService"
_STREAM_WINDOW = 64  # stream messages in flight at once; beyond this the reader waits
# RPCs that run a model take one of max_concurrent_rpcs; Info only reads the pool.
_MODEL_METHODS = ("Embed", "EmbedStream", "Rerank", "Tokenize")


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The one place errors become gRPC status codes: each error class names its own."""
    return getattr(grpc.StatusCode, grpc_code_of(exc))


def error_trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """What a client needs beside the status: the error class (so it maps back exactly),
    the request id, and how long to wait where waiting helps (ours and gRPC's own key,
    which stock clients with a retry policy honour)."""
    trailers = [("edge-embed-error", type(exc).__name__ if isinstance(exc, EdgeEmbedError) else "EdgeEmbedError"),
                ("request-id", REQUEST_ID.get())]
    hint = retry_after_ms_of(exc)
    if hint is not None:
        trailers += [("retry-after-ms", str(int(hint))), ("grpc-retry-pushback-ms", str(int(hint)))]
    elif grpc_code_of(exc) in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        trailers.append(("grpc-retry-pushback-ms", "-1"))  # a stock retry policy must not retry it
    return tuple(trailers)


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can say why."""

    def __init__(self, error: EdgeEmbedError):
        self.error = error


class _Admitted:
    """A parsed request and the memory it holds until it is answered."""

    def __init__(self, message: Any, reservation: Reservation):
        self.message = message
        self.reservation = reservation


def _parser(message_type: type, max_bytes: int, service: EmbeddingService) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Malformed(RequestTooLargeError(f"the request is {len(data)} bytes; the limit is {max_bytes}"))
        try:
            reservation = service.memory.reserve(len(data))
        except EdgeEmbedError as exc:
            return _Malformed(exc)
        try:
            return _Admitted(message_type.FromString(data), reservation)
        except DecodeError as exc:
            reservation.release()
            return _Malformed(InvalidInputError(
                f"the request does not parse (invalid UTF-8 in a string field?): {exc}"))

    return parse


def _unparsed(data: bytes) -> None:
    """The deserializer of a call refused at the door: its bytes are never parsed or charged."""
    return None


def _deadline(context: grpc.aio.ServicerContext | None) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


def _kinds(item: Any) -> list[str | None]:
    """The kinds of an Input's parts (one for a text or an image), without copying bytes."""
    kind = item.WhichOneof("kind")
    return [part.WhichOneof("kind") for part in item.parts.parts] if kind == "parts" else [kind]


def _typed_input(service: EmbeddingService, item: Any, name: str) -> EmbedInput:
    """One Input as the core's input: an image's header checked, nothing decoded."""
    kind = item.WhichOneof("kind")
    if kind == "text":
        return item.text
    if kind == "image":
        return service.open_image(item.image, f"{name}.image")
    if kind == "parts":
        if not item.parts.parts:
            raise InvalidInputError(f"{name}.parts is empty")
        parts: list[str | Image] = []
        for j, part in enumerate(item.parts.parts):
            which = part.WhichOneof("kind")
            if which is None:
                raise InvalidInputError(f"{name}.parts[{j}] is neither a text nor an image")
            parts.append(part.text if which == "text" else service.open_image(part.image, f"{name}.parts[{j}].image"))
        return parts
    raise InvalidInputError(f"{name} is neither a text, an image nor parts")


def _typed_inputs(service: EmbeddingService, items: Any, field: str = "items") -> list[EmbedInput]:
    """Repeated Inputs as the core's inputs: images' headers checked, nothing decoded."""
    return [_typed_input(service, item, f"{field}[{i}]") for i, item in enumerate(items)]


class GrpcApi:
    """The EmbeddingService RPC bodies: protobuf in, a core call, protobuf out."""

    def __init__(self, service: EmbeddingService):
        self.service = service

    async def embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if request.items and request.inputs:
            raise InvalidInputError("send inputs (texts) or items (typed inputs), not both")
        field, count, images = "inputs", len(request.inputs), 0
        inputs: Callable[[], list[EmbedInput]] = lambda: list(request.inputs)  # noqa: E731
        if request.items:
            field, count = "items", len(request.items)
            images = sum(1 for item in request.items for kind in _kinds(item) if kind == "image")
            inputs = lambda: _typed_inputs(self.service, request.items)  # noqa: E731
        if request.matrix_dtype not in (pb.MATRIX_DTYPE_FLOAT32, pb.MATRIX_DTYPE_FLOAT16):
            raise InvalidInputError(f"matrix_dtype {request.matrix_dtype} is not FLOAT32 or FLOAT16")
        dtype = "<f2" if request.matrix_dtype == pb.MATRIX_DTYPE_FLOAT16 else "<f4"
        done = await self.service.embed_texts(
            request.model, count, request.ByteSize(), inputs,
            instruction=request.instruction, dimensions=request.dimensions or None,
            normalize=request.normalize if request.HasField("normalize") else True,
            truncate=request.truncate if request.HasField("truncate") else True,
            deadline=_deadline(context), field=field, images=images, input_type=request.input_type or None,
            answer_bytes_per_value=4 + 2 * np.dtype(dtype).itemsize,  # the vectors, the data bytes, the message
        )
        try:
            return await self._embed_response(request, done, dtype)
        finally:
            done.release()

    async def _embed_response(self, request: pb.EmbedRequest, done: Any, dtype: str) -> pb.EmbedResponse:
        packed = request.vector_format == pb.VECTOR_FORMAT_PACKED
        multi = done.vectors.dtype == object
        if not multi and request.matrix_dtype != pb.MATRIX_DTYPE_FLOAT32:
            raise InvalidInputError("matrix_dtype is for multi-vector models, whose answers are matrices")

        def build() -> pb.EmbedResponse:
            response = pb.EmbedResponse(token_counts=done.token_counts, model=done.model,
                                        dimensions=done.dimensions, queue_ms=done.queue_s * 1000,
                                        inference_ms=done.inference_s * 1000)
            if multi:
                response.matrices.extend(
                    pb.TokenMatrix(rows=m.shape[0], dim=m.shape[1], dtype="float16" if dtype == "<f2" else "float32",
                                   data=m.astype(dtype).tobytes()) for m in done.vectors)
            elif packed:
                response.packed = np.ascontiguousarray(done.vectors, dtype="<f4").tobytes()
            else:
                add = response.embeddings.add
                for v in done.vectors:
                    add().values.extend(v)
            return response

        values = sum(m.size for m in done.vectors) if multi else 0 if packed else done.vectors.size
        return await self.service.shape(values, build)

    async def rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        if request.HasField("query_item") and request.query:
            raise InvalidInputError("send query (a text) or query_item (a typed input), not both")
        if request.document_items and request.documents:
            raise InvalidInputError("send documents (texts) or document_items (typed inputs), not both")
        query: EmbedInput = request.query
        if request.HasField("query_item"):
            query = _typed_input(self.service, request.query_item, "query_item")
        field, count, images = "documents", len(request.documents), 0
        documents: Callable[[], list[EmbedInput]] = lambda: list(request.documents)  # noqa: E731
        typed = bool(request.document_items)
        if typed:
            field, count = "document_items", len(request.document_items)
            images = sum(1 for item in request.document_items for kind in _kinds(item) if kind == "image")
            documents = lambda: _typed_inputs(self.service, request.document_items, field)  # noqa: E731
        done = await self.service.rerank_documents(
            request.model, query, count, request.ByteSize(), documents,
            instruction=request.instruction, top_n=request.top_n or None,
            return_documents=request.return_documents, deadline=_deadline(context), field=field, images=images)

        def result(r) -> pb.RerankResult:
            if typed and request.return_documents:
                return pb.RerankResult(index=r.index, score=r.score, document_item=request.document_items[r.index])
            return pb.RerankResult(index=r.index, score=r.score, document=r.document or "")

        return pb.RerankResponse(results=[result(r) for r in done.results], token_counts=done.token_counts,
                                 model=done.model, queue_ms=done.queue_s * 1000, inference_ms=done.inference_s * 1000)

    async def tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        done = await self.service.tokenize_texts(request.model, list(request.inputs), instruction=request.instruction,
                                                 deadline=_deadline(context))
        return pb.TokenizeResponse(tokens=[pb.TokenIds(ids=s.tolist()) for s in done.seqs],
                                   token_counts=[len(s) for s in done.seqs])

    async def info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        """The named (or default) model's facts, every model's state and the memory budget."""
        service = self.service
        facts, c, pool = service.facts(request.model), service.config, service.pool
        return pb.InfoResponse(
            model=facts.name, dim=facts.dim, min_dim=facts.min_dim, max_length=facts.max_length,
            instruction_aware=facts.instruction_aware, default_instruction=facts.default_instruction,
            precision=facts.precision, backend=facts.backend, execution_providers=list(facts.execution_providers),
            batching=pb.BatchingLimits(
                max_batch_tokens=c.max_batch_tokens, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                max_queue_tokens=c.queue_tokens, max_inputs_per_request=c.max_inputs,
                max_text_chars=c.max_text_chars, max_concurrent_rpcs=c.max_concurrent_rpcs,
                run_timeout_s=c.run_timeout_s, max_instruction_chars=c.max_instruction_chars,
                max_batch_ms=c.max_batch_ms,
            ),
            version=__version__,
            models=[_model_status(s) for s in pool.status()],
            task=facts.task,
            modalities=list(facts.modalities),
            memory=pb.MemoryBudget(budget_bytes=pool.budget_bytes, committed_bytes=pool.committed_bytes,
                                   base_bytes=pool.base_bytes, rss_bytes=rss_bytes() or 0,
                                   requests_bytes=service.memory.held),
        )

    async def embed_stream(self, requests: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedStreamResponse]:
        """Answers in request order; messages are computed concurrently so they can share batches.

        At most `_STREAM_WINDOW` messages are in flight; when the client goes away, the
        reader and every message still in flight are cancelled, and every message's
        memory is released (also for messages cancelled before they started).
        """
        if self.service.busy():  # passed the door, but others took the last slots meanwhile
            await _abort(context, self.service.busy_error())
        window: asyncio.Queue = asyncio.Queue(maxsize=_STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.ensure_future(self._answer(request, context))
                    if isinstance(request, _Admitted):
                        task.add_done_callback(lambda _, r=request.reservation: r.release())
                    await window.put(task)
            except asyncio.CancelledError:
                raise  # the consumer is gone; nobody waits for the end marker
            except Exception:  # noqa: BLE001 - a broken client stream simply ends the stream
                pass
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            with self.service.slot():
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
        REQUEST_ID.set(rid or new_request_id())
        try:
            if isinstance(request, _Malformed):
                raise request.error
            response = await self.embed(message, context)
        except Exception as exc:  # noqa: BLE001 - one message's error is that message's answer
            code = grpc_status(exc)
            self.service.refused(exc)
            self.service.metrics.requests.labels("EmbedStream.message", code.name).inc()
            return pb.EmbedStreamResponse(request_id=rid,
                                          error=pb.StreamError(code=code.name, message=public_message(exc)))
        self.service.metrics.requests.labels("EmbedStream.message", "OK").inc()
        return pb.EmbedStreamResponse(request_id=rid, response=response)


def _model_status(s: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=s.name, model_id=s.model_id, state=s.state.value, pinned=s.pinned, precision=s.precision,
        charged_bytes=s.charged_bytes, charged_from=s.charged_from,
        resident_measured_bytes=max(0, s.resident_measured_bytes or 0), loads=s.loads,
        evictions=s.evictions, requests=s.requests, parity_cos_min=s.parity_cos_min or 0.0,
        parity_ok=bool(s.parity_ok), error=s.error or "", task=s.task,
    )


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    await context.abort(grpc_status(exc), public_message(exc), trailing_metadata=error_trailers(exc))


def _unary(service: EmbeddingService, name: str, body: Callable, *, takes_slot: bool) -> Callable:
    """Wrap an RPC body: a request id, a concurrency slot for model work, the count, and
    any error turned into its status (never a crash); its memory released on every way out."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUEST_ID.set(new_request_id())
        try:
            if isinstance(request, _Malformed):
                raise request.error
            if takes_slot:
                with service.slot():
                    response = await body(request.message, context)
            else:
                response = await body(request.message, context)
        except asyncio.CancelledError:
            service.metrics.requests.labels(name, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            service.refused(exc)
            service.metrics.requests.labels(name, grpc_status(exc).name).inc()
            await _abort(context, exc)
        finally:
            if isinstance(request, _Admitted):
                request.reservation.release()
        service.metrics.requests.labels(name, "OK").inc()
        return response

    return handler


class _ServiceHandler(grpc.GenericRpcHandler):
    """The EmbeddingService's methods, with the concurrency limit checked at the door: a
    call refused for load is never parsed, so it holds no request memory."""

    def __init__(self, service: EmbeddingService, handlers: dict[str, grpc.RpcMethodHandler]):
        self._service = service
        self._handlers = {f"/{SERVICE_NAME}/{name}": (name, h) for name, h in handlers.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        found = self._handlers.get(handler_call_details.method)
        if found is None:
            return None
        name, handler = found
        if name in _MODEL_METHODS and self._service.busy():
            error = self._service.busy_error()
            self._service.refused(error)
            self._service.metrics.requests.labels(name, grpc_status(error).name).inc()
            return refusing_handler(handler, error)
        return handler


def refusing_handler(handler: grpc.RpcMethodHandler, error: EdgeEmbedError) -> grpc.RpcMethodHandler:
    """A handler answering `error` without reading the request: it takes the request as a
    stream it never reads (the wire is the same for a unary client), so a refused call's
    message is never received, let alone parsed."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUEST_ID.set(new_request_id())
        await _abort(context, error)

    async def deny_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext):
        REQUEST_ID.set(new_request_id())
        await _abort(context, error)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, _unparsed, handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(deny, _unparsed, handler.response_serializer)


def method_handlers(service: EmbeddingService, max_message_bytes: int) -> grpc.GenericRpcHandler:
    api = GrpcApi(service)

    def parse(message_type: type) -> Callable[[bytes], Any]:
        return _parser(message_type, max_message_bytes, service)

    def unary(name: str, body: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            _unary(service, name, body, takes_slot=name in _MODEL_METHODS), parse(request),
            response.SerializeToString)

    return _ServiceHandler(service, {
        "Embed": unary("Embed", api.embed, pb.EmbedRequest, pb.EmbedResponse),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            api.embed_stream, parse(pb.EmbedRequest), pb.EmbedStreamResponse.SerializeToString),
        "Rerank": unary("Rerank", api.rerank, pb.RerankRequest, pb.RerankResponse),
        "Tokenize": unary("Tokenize", api.tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        "Info": unary("Info", api.info, pb.InfoRequest, pb.InfoResponse),
    })


class ArrivalInterceptor(grpc.aio.ServerInterceptor):
    """The outermost interceptor: a model call is refused at the door (never read) when the
    requests being handled and the calls still arriving fill the request memory left, else
    counted as arriving until its message is in, so request memory leaves room for what
    the transport holds. Calls already refused (auth, load) are never read, so they
    neither count nor change answer."""

    def __init__(self, service: EmbeddingService):
        self._service = service
        self._methods = {f"/{SERVICE_NAME}/{name}": name for name in _MODEL_METHODS}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        name = self._methods.get(details.method)
        if handler is None or name is None or handler.request_deserializer is _unparsed:
            return handler
        if (error := self._service.memory.door_refusal()) is not None:
            self._service.refused(error)
            self._service.metrics.requests.labels(name, grpc_status(error).name).inc()
            return refusing_handler(handler, error)
        return _counting_arrival(handler, self._service.memory.arrival())


def _counting_arrival(handler: grpc.RpcMethodHandler, arrival: Arrival) -> grpc.RpcMethodHandler:
    """`handler` with its deserializer ending `arrival` once the (first) message is in."""
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        arrival.done(len(data))
        return parse(data) if parse is not None else data

    return handler._replace(request_deserializer=deserialize)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks. A
    denied call's bytes are never parsed, so it reserves no request memory."""

    _OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._token = token.encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if details.method.startswith(self._OPEN_PREFIXES) or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else bytes(given)
        if bearer_matches(given, self._token):
            return handler
        return refusing_handler(handler, UnauthenticatedError(
            "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"))
