"""The edge_embed.v1 EmbeddingService: request checks, batching, and the one error mapping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .. import __version__
from ..errors import EdgeEmbedError, InvalidInputError, UnauthenticatedError
from ..v1 import embed_pb2 as pb
from ..memory import rss_bytes
from .batcher import WorkerDiedError
from .config import ServerConfig
from .metrics import ServerMetrics
from .pool import ModelPool

__all__ = ["EmbeddingService", "grpc_status", "SERVICE_NAME", "method_handlers", "BearerTokenInterceptor"]

SERVICE_NAME = "edge_embed.v1.EmbeddingService"
_STREAM_WINDOW = 64  # stream messages in flight at once; beyond this the reader waits


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The one place errors become status codes: each error class names its own."""
    if isinstance(exc, EdgeEmbedError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    return grpc.StatusCode.INTERNAL


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can say why."""

    def __init__(self, reason: str):
        self.reason = reason


def _safe_deserializer(message_type: type, max_bytes: int) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Malformed(f"the request is {len(data)} bytes; the limit is {max_bytes}")
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Malformed(f"the request does not parse (invalid UTF-8 in a string field?): {exc}")

    return parse


class EmbeddingService:
    """Checks every request field, then hands token ids to the requested model's batcher."""

    def __init__(self, pool: ModelPool, config: ServerConfig, metrics: ServerMetrics):
        self.pool = pool
        self.config = config
        self.metrics = metrics

    # -- request checks ---------------------------------------------------------------

    def _check_inputs(self, inputs: list[str]) -> None:
        if not inputs:
            raise InvalidInputError("inputs is empty: send at least one text")
        if len(inputs) > self.config.max_inputs:
            raise InvalidInputError(f"inputs has {len(inputs)} texts; the limit is {self.config.max_inputs}")
        for i, text in enumerate(inputs):
            if len(text) > self.config.max_text_chars:
                raise InvalidInputError(
                    f"inputs[{i}] has {len(text)} characters; the limit is {self.config.max_text_chars}"
                )

    @staticmethod
    async def _tokenize(provider: Any, inputs: list[str], instruction: str, truncate: bool) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None,
            lambda: provider.tokenize(inputs, instruction=instruction or None, truncate=truncate, field="inputs"),
        )

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext | None) -> float | None:
        remaining = context.time_remaining() if context is not None else None
        return None if remaining is None else time.monotonic() + remaining

    # -- RPC bodies -------------------------------------------------------------------

    async def embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        start = time.monotonic()
        if isinstance(request, _Malformed):
            raise InvalidInputError(request.reason)
        self.pool.find(request.model)
        inputs = list(request.inputs)
        self._check_inputs(inputs)
        normalize = request.normalize if request.HasField("normalize") else True
        truncate = request.truncate if request.HasField("truncate") else True
        deadline = self._deadline(context)
        async with self.pool.use(request.model, deadline) as model:
            provider, batcher = model.provider, model.batcher
            try:
                width = provider.manifest.check_dimensions(request.dimensions or None)
            except InvalidInputError as exc:
                raise InvalidInputError(f"dimensions: {exc}") from None
            seqs = await self._tokenize(provider, inputs, request.instruction, truncate)
            self.metrics.queue_depth.set(batcher.depth)
            result = await batcher.submit(seqs, deadline)
            vectors = provider.finish(result.vectors, width, normalize)
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.total_seconds.observe(time.monotonic() - start)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v.tolist()) for v in vectors],
            token_counts=[len(s) for s in seqs],
            model=model.name,
            dimensions=width,
            queue_ms=result.queue_s * 1000,
            inference_ms=result.inference_s * 1000,
        )

    async def tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        if isinstance(request, _Malformed):
            raise InvalidInputError(request.reason)
        self.pool.find(request.model)
        inputs = list(request.inputs)
        self._check_inputs(inputs)
        async with self.pool.use(request.model, self._deadline(context)) as model:
            seqs = await self._tokenize(model.provider, inputs, request.instruction, True)
        return pb.TokenizeResponse(
            tokens=[pb.TokenIds(ids=s.tolist()) for s in seqs], token_counts=[len(s) for s in seqs]
        )

    async def info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        """The named (or default) model's facts, every model's state and the memory budget;
        a model never loaded is described from its manifest alone."""
        if isinstance(request, _Malformed):
            raise InvalidInputError(request.reason)
        model, c, pool = self.pool.find(request.model), self.config, self.pool
        top: dict[str, Any] = {}
        if model.info is not None:
            info = model.info
            top = dict(precision=info.precision, backend=info.backend,
                       execution_providers=list(info.execution_providers))
        manifest = model.manifest or model.source_manifest()
        return pb.InfoResponse(
            model=model.name,
            dim=manifest.dim,
            min_dim=manifest.matryoshka_min_dim or manifest.dim,
            max_length=manifest.max_length,
            instruction_aware=manifest.instruction_template is not None,
            default_instruction=manifest.default_instruction or "",
            batching=pb.BatchingLimits(
                max_batch_tokens=c.max_batch_tokens, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                max_queue=c.max_queue, max_inputs_per_request=c.max_inputs, max_text_chars=c.max_text_chars,
            ),
            version=__version__,
            models=[_model_status(s) for s in pool.status()],
            memory=pb.MemoryBudget(budget_bytes=pool.budget_bytes, committed_bytes=pool.committed_bytes,
                                   base_bytes=pool.base_bytes, rss_bytes=rss_bytes() or 0),
            **top,
        )

    async def embed_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        """Answers in request order; messages are computed concurrently so they can share batches."""
        pending: asyncio.Queue = asyncio.Queue(maxsize=_STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in requests:
                    rid = "" if isinstance(request, _Malformed) else request.request_id
                    task = asyncio.ensure_future(self._answer(request, context))
                    await pending.put((rid, task))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (entry := await pending.get()) is not None:
                rid, task = entry
                yield await task
        finally:
            reader.cancel()

    async def _answer(self, request: Any, context: grpc.aio.ServicerContext) -> pb.EmbedStreamResponse:
        rid = "" if isinstance(request, _Malformed) else request.request_id
        try:
            response = await self.embed(request, context)
        except EdgeEmbedError as exc:
            self.metrics.requests.labels("EmbedStream.message", grpc_status(exc).name).inc()
            return pb.EmbedStreamResponse(request_id=rid, error=pb.StreamError(code=grpc_status(exc).name, message=str(exc)))
        self.metrics.requests.labels("EmbedStream.message", "OK").inc()
        return pb.EmbedStreamResponse(request_id=rid, response=response)


def _model_status(s: dict[str, Any]) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=s["name"], model_id=s["model_id"], state=s["state"], pinned=s["pinned"], precision=s["precision"],
        charged_bytes=s["charged_bytes"], charged_from=s["charged_from"],
        resident_measured_bytes=max(0, s["resident_measured_bytes"] or 0), loads=s["loads"],
        evictions=s["evictions"], requests=s["requests"], parity_cos_min=s["parity_cos_min"] or 0.0,
        parity_ok=bool(s["parity_ok"]), error=s["error"] or "",
    )


def _retry_metadata(exc: BaseException) -> tuple:
    """The `retry-after-ms` hint of errors a retry can cure (a full queue, a loading model)."""
    hint = getattr(exc, "retry_after_ms", None)
    if hint is None and isinstance(exc, WorkerDiedError):
        hint = 1000
    return (("retry-after-ms", str(int(hint))),) if hint is not None else ()


def _unary(service: EmbeddingService, name: str, body: Callable) -> Callable:
    """Wrap an RPC body: count it, and turn any error into its status (never a crash)."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            response = await body(request, context)
        except asyncio.CancelledError:
            service.metrics.requests.labels(name, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            code = grpc_status(exc)
            service.metrics.requests.labels(name, code.name).inc()
            message = str(exc) if isinstance(exc, EdgeEmbedError) else f"internal error: {exc!r}"
            await context.abort(code, message, trailing_metadata=_retry_metadata(exc))
        service.metrics.requests.labels(name, "OK").inc()
        return response

    return handler


def method_handlers(service: EmbeddingService, max_message_bytes: int) -> grpc.GenericRpcHandler:
    def parse(message_type: type) -> Callable[[bytes], Any]:
        return _safe_deserializer(message_type, max_message_bytes)

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Embed": grpc.unary_unary_rpc_method_handler(
                _unary(service, "Embed", service.embed), parse(pb.EmbedRequest), pb.EmbedResponse.SerializeToString
            ),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(
                service.embed_stream, parse(pb.EmbedRequest), pb.EmbedStreamResponse.SerializeToString
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
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if details.method.startswith(self._OPEN_PREFIXES) or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
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
