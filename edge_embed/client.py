"""Clients for the edge_embed.v1 gRPC API, sync and asyncio, with deadlines and retries.

Errors come back as the edge-embed error the server raised: it names the class in the
`edge-embed-error` trailer (one of edge_embed.errors' public classes; any other name is
ignored). Without that trailer (an older server, or a call that never reached one) the
status code picks the class. The message is the status code and the server's details.

A call is retried only where the server says waiting helps: RESOURCE_EXHAUSTED or
UNAVAILABLE with a hint (`retry-after-ms`, else gRPC's `grpc-retry-pushback-ms`), after
that many milliseconds; and UNAVAILABLE without an `edge-embed-error` trailer, a transport
failure (no server answered), after an exponential backoff. Every other error, an
UNAVAILABLE that names its class without a hint included, fails at once. All attempts
share the call's one deadline.

Other clients get the same policy from stock gRPC retries with `SERVICE_CONFIG`, gRPC
service config JSON (`retryPolicy`), passed as the channel's default service config:

    Python   grpc.insecure_channel(target, options=[("grpc.service_config", SERVICE_CONFIG)])
    Go       grpc.NewClient(target, grpc.WithDefaultServiceConfig(serviceConfig), ...)
    Java     ManagedChannelBuilder.forTarget(target).defaultServiceConfig(parsedJsonMap).enableRetry()
    C++      grpc::ChannelArguments args; args.SetServiceConfigJSON(serviceConfig);

gRPC then retries UNAVAILABLE and RESOURCE_EXHAUSTED up to `maxAttempts` (it caps that
at 5), waits `grpc-retry-pushback-ms` where the server sends it and the backoff where it
does not, and stops at a negative pushback. It reads no other trailer, so it also retries
an error of those codes that the server sent without a pushback, and it never retries a
request bigger than the channel's retry buffer (`grpc.per_rpc_retry_buffer_size`, 256 KiB)
or one whose response headers arrived. grpcurl takes no service config and never retries:
`grpcurl -v` prints the trailers (`edge-embed-error`, the hints) for a script to act on.

These clients do not pass SERVICE_CONFIG: their channels set `grpc.enable_retries` to 0,
which turns gRPC's retries off even under a service config, so the loop here is the only
one that retries (both together would multiply attempts, gRPC's inside each of ours), and
it keeps what gRPC cannot: the trailer test, more than 5 attempts, requests of any size.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from . import errors
from .errors import (
    BackendUnavailableError,
    BundleError,
    EdgeEmbedError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
)
from .images import Image
from .v1 import embed_pb2 as pb

__all__ = ["EmbedClient", "AsyncEmbedClient", "SERVICE_CONFIG", "ERROR_TRAILER", "health_service_name", "token_matrices"]

_SERVICE = "edge_embed.v1.EmbeddingService"
_METHOD = f"/{_SERVICE}/"
ERROR_TRAILER = "edge-embed-error"  # the edge_embed.errors class name of a failed call
_RETRY_AFTER = "retry-after-ms"
_PUSHBACK = "grpc-retry-pushback-ms"
# One retry policy: this module's loop (retries=3 is maxAttempts 4) and SERVICE_CONFIG.
_RETRIES = 3
_INITIAL_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0
_BACKOFF_MULTIPLIER = 2
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": _SERVICE}],
    "retryPolicy": {
        "maxAttempts": _RETRIES + 1,
        "initialBackoff": f"{_INITIAL_BACKOFF_S}s",
        "maxBackoff": f"{_MAX_BACKOFF_S}s",
        "backoffMultiplier": _BACKOFF_MULTIPLIER,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    },
}]})
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: BundleError,
}
_RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def health_service_name(model: str) -> str:
    """The grpc.health.v1 service name under which a server reports one of its models."""
    return f"{_SERVICE}/{model}"


def _takes_message(cls: type) -> bool:
    try:
        inspect.signature(cls).bind("message")
    except TypeError:
        return False
    return True


def _wire_classes() -> dict[str, type[EdgeEmbedError]]:
    """The classes a trailer may name, each as the nearest class of its ancestry that can
    be made from a message alone (GateError's fields stay on the server: ExportError)."""
    classes = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, EdgeEmbedError):
            classes[name] = next(c for c in cls.__mro__ if issubclass(c, EdgeEmbedError) and _takes_message(c))
    return classes


_WIRE_CLASSES = _wire_classes()


def _credentials(root_cert: Path | None, client_cert: Path | None, client_key: Path | None):
    if root_cert is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_cert.read_bytes() if root_cert else None,
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )


def _request(texts, instruction, dimensions, normalize, truncate, model) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not a single string")
    options = dict(instruction=instruction or "", dimensions=dimensions or 0, normalize=normalize,
                   truncate=truncate, model=model or "")
    texts = list(texts)
    if all(isinstance(t, str) for t in texts):
        return pb.EmbedRequest(inputs=texts, **options)
    return pb.EmbedRequest(items=[_item(t, i) for i, t in enumerate(texts)], **options)


def _item(value: object, index: int, field: str = "texts") -> pb.Input:
    """A str, an edge_embed.Image, or a list of both (one mixed input) as a typed Input."""
    if isinstance(value, str):
        return pb.Input(text=value)
    if isinstance(value, Image):
        return pb.Input(image=value.data)
    if isinstance(value, (list, tuple)):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(pb.Part(text=part))
            elif isinstance(part, Image):
                parts.append(pb.Part(image=part.data))
            else:
                raise InvalidInputError(f"{field}[{index}] holds a {type(part).__name__}; parts are str or Image")
        return pb.Input(parts=pb.Parts(parts=parts))
    raise InvalidInputError(f"{field}[{index}] must be a str, an edge_embed.Image or a list of both, got "
                            f"{type(value).__name__}")


def token_matrices(response: pb.EmbedResponse) -> list[np.ndarray]:
    """A multi-vector model's answer: each input's [tokens, dim] token vectors (float32, or
    float16 as the request asked)."""
    out = []
    for i, m in enumerate(response.matrices):
        dtype = {"float32": "<f4", "float16": "<f2"}.get(m.dtype)
        if dtype is None or len(m.data) != m.rows * m.dim * np.dtype(dtype).itemsize:
            raise InvalidInputError(f"matrices[{i}] does not hold {m.rows} x {m.dim} {m.dtype} values")
        out.append(np.frombuffer(m.data, dtype=dtype).reshape(m.rows, m.dim))
    return out


def _multi_request(items: Sequence[object], input_type: str, matrix_dtype: str, truncate: bool,
                   model: str | None) -> pb.EmbedRequest:
    if isinstance(items, str):
        raise InvalidInputError("items must be a list, not a single string")
    dtypes = {"float32": pb.MATRIX_DTYPE_FLOAT32, "float16": pb.MATRIX_DTYPE_FLOAT16}
    if matrix_dtype not in dtypes:
        raise InvalidInputError(f"matrix_dtype must be float32 or float16, got {matrix_dtype!r}")
    return pb.EmbedRequest(items=[_item(x, i, "items") for i, x in enumerate(items)], input_type=input_type,
                           matrix_dtype=dtypes[matrix_dtype], truncate=truncate, model=model or "")


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    if not response.embeddings:
        return np.zeros((0, response.dimensions), dtype=np.float32)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def _trailers(exc: grpc.RpcError) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if isinstance(value, str):
            found.setdefault(key, value)
    return found


def _hint_ms(trailers: dict[str, str]) -> int | None:
    """The wait the server asked for; a negative pushback means "do not retry": no hint."""
    for key in (_RETRY_AFTER, _PUSHBACK):
        if trailers.get(key, "").isdigit():
            return int(trailers[key])
    return None


def _translate(exc: grpc.RpcError) -> EdgeEmbedError:
    """The error the server raised, with the wait it asked for (None where it gave none)."""
    trailers = _trailers(exc)
    cls = _WIRE_CLASSES.get(trailers.get(ERROR_TRAILER, "")) or _ERRORS.get(exc.code(), EdgeEmbedError)
    error = cls(f"{exc.code().name}: {exc.details()}")
    error.retry_after_ms = _hint_ms(trailers)
    return error


def _retry_delay(exc: grpc.RpcError, attempt: int, retries: int, deadline: float) -> float | None:
    """Seconds to wait before the next attempt, or None when the call fails now: the server
    gave no hint for it, no attempt is left, or the wait would pass the deadline."""
    code, trailers = exc.code(), _trailers(exc)
    hint = _hint_ms(trailers)
    transport = code == grpc.StatusCode.UNAVAILABLE and ERROR_TRAILER not in trailers and _PUSHBACK not in trailers
    if attempt >= retries or code not in _RETRYABLE_CODES or (hint is None and not transport):
        return None
    backoff = min(_MAX_BACKOFF_S, _INITIAL_BACKOFF_S * _BACKOFF_MULTIPLIER**attempt)
    delay = hint / 1000 if hint is not None else backoff
    return None if time.monotonic() + delay >= deadline else delay


class _Options:
    def __init__(self, target, *, token, root_cert, client_cert, client_key, timeout, retries):
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials = _credentials(root_cert, client_cert, client_key)
        self.timeout = timeout
        self.retries = retries
        # gRPC's own retries off, service config or not: the loop in `_call` is the one.
        self.options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 0)]

    def channel(self, grpc_module):
        """A channel of `grpc` or `grpc.aio`, secure when TLS options were given."""
        if self.credentials:
            return grpc_module.secure_channel(self.target, self.credentials, self.options)
        return grpc_module.insecure_channel(self.target, self.options)


def _stubs(channel) -> tuple:
    """(Embed, Info, Tokenize, Rerank) callables on a channel, sync or asyncio alike."""
    def stub(name: str, request, response):
        return channel.unary_unary(_METHOD + name, request.SerializeToString, response.FromString)

    return (stub("Embed", pb.EmbedRequest, pb.EmbedResponse), stub("Info", pb.InfoRequest, pb.InfoResponse),
            stub("Tokenize", pb.TokenizeRequest, pb.TokenizeResponse),
            stub("Rerank", pb.RerankRequest, pb.RerankResponse))


def _rerank_request(query: object, documents: Sequence[object], instruction: str | None, top_n: int | None,
                    return_documents: bool, model: str | None) -> pb.RerankRequest:
    """Texts go as texts; a query or documents holding images (for a reranker that reads
    them) go as typed inputs."""
    if isinstance(documents, str):
        raise InvalidInputError("documents must be a list, not a single string")
    documents = list(documents)
    options = dict(instruction=instruction or "", top_n=top_n or 0, return_documents=return_documents,
                   model=model or "")
    typed = {} if isinstance(query, str) else {"query_item": _item(query, 0, "query")}
    if all(isinstance(d, str) for d in documents):
        return pb.RerankRequest(query=query if not typed else "", documents=documents, **typed, **options)
    return pb.RerankRequest(query=query if not typed else "",
                            document_items=[_item(d, i, "documents") for i, d in enumerate(documents)], **typed,
                            **options)


def _tokenize_request(texts: Sequence[str], instruction: str | None, model: str | None) -> pb.TokenizeRequest:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not a single string")
    return pb.TokenizeRequest(inputs=list(texts), instruction=instruction or "", model=model or "")


def _token_ids(response: pb.TokenizeResponse) -> list[list[int]]:
    return [list(t.ids) for t in response.tokens]


class EmbedClient:
    """Blocking client. `with EmbedClient("host:port") as c: c.embed([...])`."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None,
                 timeout: float = 10.0, retries: int = _RETRIES):
        self._o = _Options(target, token=token, root_cert=root_cert, client_cert=client_cert,
                           client_key=client_key, timeout=timeout, retries=retries)
        self._channel = self._o.channel(grpc)
        self._embed, self._info, self._tokenize, self._rerank = _stubs(self._channel)

    def _call(self, method, request):
        deadline = time.monotonic() + self._o.timeout
        for attempt in range(self._o.retries + 1):
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._o.metadata)
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, attempt, self._o.retries, deadline)
                if delay is None:
                    raise _translate(exc) from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    def embed(self, texts: Sequence[str], *, instruction: str | None = None, dimensions: int | None = None,
              normalize: bool = True, truncate: bool = True, model: str | None = None) -> np.ndarray:
        return _vectors(self.embed_response(texts, instruction=instruction, dimensions=dimensions,
                                            normalize=normalize, truncate=truncate, model=model))

    def embed_response(self, texts: Sequence[str], **options) -> pb.EmbedResponse:
        """The full response: vectors, token counts, queue and inference times."""
        o = {"instruction": None, "dimensions": None, "normalize": True, "truncate": True, "model": None, **options}
        return self._call(self._embed, _request(texts, **o))

    def embed_multi(self, items: Sequence[object], *, input_type: str = "document", matrix_dtype: str = "float32",
                    truncate: bool = True, model: str | None = None) -> list[np.ndarray]:
        """A multi-vector model's token vectors: one [tokens, dim] matrix per input (texts,
        Images or lists of both), read as queries or documents."""
        return token_matrices(self._call(self._embed, _multi_request(items, input_type, matrix_dtype, truncate, model)))

    def rerank(self, query: str | Image | Sequence[str | Image], documents: Sequence[object], *,
               instruction: str | None = None, top_n: int | None = None, return_documents: bool = False,
               model: str | None = None) -> pb.RerankResponse:
        """Scores of `documents` for `query` from a reranker, best first (`top_n` of them); a
        reranker that reads images takes images and mixes (lists of str and Image) too."""
        return self._call(self._rerank, _rerank_request(query, documents, instruction, top_n, return_documents, model))

    def tokenize(self, texts: Sequence[str], *, instruction: str | None = None,
                 model: str | None = None) -> list[list[int]]:
        """Token ids of each text as the model sees it (with `instruction`: as a query)."""
        return _token_ids(self._call(self._tokenize, _tokenize_request(texts, instruction, model)))

    def info(self, model: str | None = None) -> pb.InfoResponse:
        """The server's models and memory; top-level fields describe `model` (default: the default one)."""
        return self._call(self._info, pb.InfoRequest(model=model or ""))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbedClient:
    """asyncio client with the same options and retry rules as EmbedClient."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None,
                 timeout: float = 10.0, retries: int = _RETRIES):
        self._o = _Options(target, token=token, root_cert=root_cert, client_cert=client_cert,
                           client_key=client_key, timeout=timeout, retries=retries)
        self._channel = self._o.channel(grpc.aio)
        self._embed, self._info, self._tokenize, self._rerank = _stubs(self._channel)

    async def _call(self, method, request):
        deadline = time.monotonic() + self._o.timeout
        for attempt in range(self._o.retries + 1):
            try:
                return await method(request, timeout=max(0.001, deadline - time.monotonic()),
                                    metadata=self._o.metadata)
            except grpc.aio.AioRpcError as exc:
                delay = _retry_delay(exc, attempt, self._o.retries, deadline)
                if delay is None:
                    raise _translate(exc) from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def embed(self, texts: Sequence[str], **options) -> np.ndarray:
        return _vectors(await self.embed_response(texts, **options))

    async def embed_response(self, texts: Sequence[str], **options) -> pb.EmbedResponse:
        o = {"instruction": None, "dimensions": None, "normalize": True, "truncate": True, "model": None, **options}
        return await self._call(self._embed, _request(texts, **o))

    async def embed_multi(self, items: Sequence[object], *, input_type: str = "document",
                          matrix_dtype: str = "float32", truncate: bool = True,
                          model: str | None = None) -> list[np.ndarray]:
        return token_matrices(await self._call(self._embed, _multi_request(items, input_type, matrix_dtype, truncate,
                                                                           model)))

    async def rerank(self, query: str | Image | Sequence[str | Image], documents: Sequence[object], *,
                     instruction: str | None = None, top_n: int | None = None, return_documents: bool = False,
                     model: str | None = None) -> pb.RerankResponse:
        return await self._call(self._rerank,
                                _rerank_request(query, documents, instruction, top_n, return_documents, model))

    async def tokenize(self, texts: Sequence[str], *, instruction: str | None = None,
                       model: str | None = None) -> list[list[int]]:
        return _token_ids(await self._call(self._tokenize, _tokenize_request(texts, instruction, model)))

    async def info(self, model: str | None = None) -> pb.InfoResponse:
        return await self._call(self._info, pb.InfoRequest(model=model or ""))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
